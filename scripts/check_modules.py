#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a circle.

Usage: scripts/check_modules.py [--graph] CRATE_SRC_DIR ...
       scripts/check_modules.py --self-test

A module is a source file (`task.rs`, `connectors/kafka.rs`, `connectors/mod.rs`). A module
depends on another when its code (tests excluded) names it through `crate::`, `super::` or `self::`
paths or a child's bare name, `use` or inline. Declaring a child (`mod kafka;`) and re-exporting it
are not dependencies: a parent that only declares its rooms does not lean on them. Nor is a module
naming its own parent or another ancestor: that is its room's shared vocabulary, not a way back
up (a parent and a child may therefore use each other). Every circle is printed, with one
line per arrow naming where it comes from, and the script exits 1; with `--graph` it prints
every arrow as well.
"""
import os
import re
import sys

PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{)")
USE_GROUP = re.compile(r"\buse\s+(crate|super|self)::\{([^;]*)\};", re.S)


def module_of(src, path):
    """`connectors/kafka.rs` -> ('connectors', 'kafka'); `connectors/mod.rs` -> ('connectors',)."""
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    if rel in (["lib"], ["main"]):
        rel = []
    return tuple(rel)


# Comments, string literals (raw ones with their `#`s, escapes and line continuations included) and
# character literals, found in one pass so that none is mistaken for another.
LITERALS = re.compile(
    r'//[^\n]*|/\*.*?\*/|b?r(#*)".*?"\1|b?"(?:\\[\s\S]|[^"\\])*"|' + r"b?'(?:\\.|[^'\\\n])'",
    re.S,
)


def strip(text):
    """The code without comments, string literals and `#[cfg(test)]` modules."""
    text = LITERALS.sub(lambda m: "" if m.group(0).startswith("/") else '""', text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def resolve(modules, base, segments):
    """The longest module named by `base` + `segments` (a path may go on to an item)."""
    full = list(base) + segments
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in modules:
            return tuple(full[:n])
    return ()


def paths_in(code):
    """Each (root, [segments]) a piece of code names, expanding `use x::{a, b::c}` groups."""
    found = []
    for m in USE_GROUP.finditer(code):
        for item in re.split(r",", re.sub(r"\{[^}]*\}", "", m.group(2))):
            item = item.strip().split(" as ")[0].strip()
            if item and item != "self":
                found.append((m.group(1), item.split("::")))
        for inner in re.finditer(r"([A-Za-z_][\w:]*)::\{", m.group(2)):
            found.append((m.group(1), inner.group(1).split("::")))
    code = USE_GROUP.sub("", code)
    for m in PATH.finditer(code):
        rest = m.group(2)
        if rest == "::{":
            continue
        found.append((m.group(1), rest.strip(":").split("::")))
    return found


def graph(src):
    files = {}
    for dirpath, _, names in os.walk(src):
        for name in names:
            if name.endswith(".rs"):
                path = os.path.join(dirpath, name)
                files[module_of(src, path)] = path
    modules = set(files)
    edges = {}
    for module, path in files.items():
        with open(path, encoding="utf-8") as f:
            code = strip(f.read())
        # A parent's `pub use child::X` re-exports its room; it is not leaning on it.
        declared = set(re.findall(r"\bmod\s+(\w+)\s*;", code))
        code = re.sub(r"\bpub(?:\([^)]*\))?\s+use\s+(?:self::)?(\w+)::[^;]*;",
                      lambda m: "" if m.group(1) in declared else m.group(0), code)
        named = paths_in(code)
        # A child named by a bare path (`kafka::KafkaSource` in connectors/mod.rs).
        for child in declared:
            for m in re.finditer(r"(?<![\w:])" + child + r"((?:::\w+)+)", code):
                named.append(("self", [child] + m.group(1).strip(":").split("::")))
        for root, segments in named:
            base = {"crate": (), "super": module[:-1], "self": module}[root]
            while root == "super" and segments and segments[0] == "super":
                segments, base = segments[1:], base[:-1]
            target = resolve(modules, base, segments)
            # Itself, or its room's own vocabulary (the crate root, a parent or an ancestor).
            if module[: len(target)] != target:
                edges.setdefault(module, {}).setdefault(target, path)
    return files, edges


def cycles(nodes, edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def name(module):
    return "::".join(module) or "crate"


def self_test():
    """The script finds a circle hidden behind literals that could fool it, and no false one."""
    import tempfile

    with tempfile.TemporaryDirectory() as src:
        files = {
            "lib.rs": "mod a;\nmod b;\nmod c;\n",
            "a.rs": 'const S: &str = "line \\\n  continued";\nuse crate::b::B;\nconst T: &str = "t";\n',
            "b.rs": 'const U: &str = "http://x";\nfn f() { crate::a::g() }\nconst C: char = \'"\';\npub struct B;\n'
            'const R: &str = r#"use crate::c::C; "quoted""#;\n',
            "c.rs": "/* use crate::a::A; */\n#[cfg(test)]\nmod tests {\n    use crate::a::A;\n}\npub struct C;\n",
        }
        for name, text in files.items():
            with open(os.path.join(src, name), "w", encoding="utf-8") as f:
                f.write(text)
        found, edges = graph(src)
        circles = cycles(found, edges)
        assert circles == [[("a",), ("b",)]], circles
        assert ("c",) not in edges and ("c",) not in edges.get(("b",), {}), edges
    print("check_modules.py: self-test passed")
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    show = "--graph" in argv
    dirs = [a for a in argv if a != "--graph"]
    if not dirs:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    failed = False
    for src in dirs:
        files, edges = graph(src)
        if show:
            for a in sorted(edges):
                print(f"{src}: {name(a)} -> {', '.join(name(b) for b in sorted(edges[a]))}")
        for component in cycles(files, edges):
            failed = True
            members = set(component)
            print(f"{src}: modules in a circle: {', '.join(name(m) for m in component)}", file=sys.stderr)
            for a in component:
                for b, path in sorted(edges.get(a, {}).items()):
                    if b in members:
                        print(f"  {name(a)} -> {name(b)}  ({os.path.relpath(path)})", file=sys.stderr)
    if failed:
        print("Move what both sides need into a module below them (see the README's worker rooms).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
