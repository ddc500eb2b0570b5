//! SQL scalar expressions: parsed with `sqlparser` (generic dialect), type-checked against a
//! [`Schema`] and compiled into a tree of nodes with column references resolved to row indexes, then
//! evaluated per row with SQL NULL semantics.
//!
//! Supported: column references (case-insensitive; quoted identifiers prefer an exact match),
//! literals (integers → `BIGINT`, decimals → `DOUBLE`, `'strings'`, `TRUE`/`FALSE`, `NULL`,
//! `TIMESTAMP '2024-01-01 00:00:00'`), arithmetic `+ - * / %` and unary `-`, comparisons
//! `= <> != < <= > >=`, `AND OR NOT`, `IS [NOT] NULL`, `IS [NOT] TRUE/FALSE`,
//! `IS [NOT] DISTINCT FROM`, `[NOT] BETWEEN`, `[NOT] IN (…)`, `[NOT] LIKE`/`ILIKE`, both `CASE` forms,
//! `CAST`/`TRY_CAST`/`x::type`, `||`, and the functions `ROUND`, `COALESCE`, `NULLIF`, `CONCAT`,
//! `ABS`, `FLOOR`, `CEIL`, `LOWER`, `UPPER`, `LENGTH`.
//!
//! Typing follows PostgreSQL where it matters: `BIGINT op BIGINT` stays `BIGINT` (division
//! truncates), mixing in a `DOUBLE` gives `DOUBLE`, `TIMESTAMP ± BIGINT` shifts by milliseconds and
//! `TIMESTAMP - TIMESTAMP` is the difference in milliseconds. Integer overflow and division by zero are
//! evaluation errors rather than silent wrap-around or infinities.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::sync::Arc;

use sqlparser::ast;
use sqlparser::ast::{BinaryOperator, UnaryOperator};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::Token;

use crate::time::{format_timestamp, parse_timestamp};
use crate::types::{DataType, Schema, Value};

/// Deepest expression tree [`Expr::from_ast`] accepts; bounds recursion in compilation and evaluation.
const MAX_DEPTH: usize = 256;

/// Functions accepted by [`Expr::compile`], for error messages.
const SUPPORTED_FUNCTIONS: &str = "ABS, CEIL, COALESCE, CONCAT, FLOOR, LENGTH, LOWER, NULLIF, ROUND, UPPER (plus CAST)";

/// Errors found when compiling an expression against a schema. Messages are meant to be shown to
/// users verbatim: they say what was wrong and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExprError {
    /// The text is not a valid SQL expression (or select list).
    #[error("{0}")]
    Parse(String),
    /// A column reference that is not in the schema.
    #[error("unknown column `{name}`; available columns: {available}{}", double_quote_hint(*.double_quoted))]
    UnknownColumn {
        /// The name as written.
        name: String,
        /// The schema's column names, comma-separated.
        available: String,
        /// Whether the name was written in double quotes (often meant as a string literal).
        double_quoted: bool,
    },
    /// Operand types that an operator or function does not accept.
    #[error("type mismatch: {0}")]
    TypeMismatch(String),
    /// Valid SQL that Eddy does not support (subqueries, unknown functions, aggregates, …).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A select-list expression without an output name.
    #[error("expression `{0}` needs a name: write `{0} AS name`")]
    MissingName(String),
    /// A malformed literal, e.g. `TIMESTAMP 'yesterday'` or an integer that does not fit `BIGINT`.
    #[error("invalid literal: {0}")]
    InvalidLiteral(String),
}

fn double_quote_hint(double_quoted: bool) -> &'static str {
    if double_quoted {
        " (double quotes name a column; write string literals in single quotes: 'text')"
    } else {
        ""
    }
}

/// Runtime evaluation error (e.g. division by zero, a CAST of `'abc'` to `BIGINT`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

impl EvalError {
    fn new(msg: impl Into<String>) -> EvalError {
        EvalError(msg.into())
    }
}

/// A compiled expression: column references resolved to indexes, types known.
#[derive(Debug, Clone)]
pub struct Expr {
    node: Node,
    /// `None` when the type is unknown, i.e. the expression is (always) NULL.
    ty: Ty,
}

impl Expr {
    /// Parses one SQL scalar expression (e.g. `"ROUND(score / 1000.0, 2)"`) and type-checks it
    /// against `schema`.
    pub fn compile(sql: &str, schema: &Schema) -> Result<Expr, ExprError> {
        let ast = parse_expr(sql)?;
        Expr::from_ast(&ast, schema)
    }

    /// Compiles an already-parsed sqlparser expression (used when the caller parsed a whole SELECT
    /// list).
    pub fn from_ast(ast: &ast::Expr, schema: &Schema) -> Result<Expr, ExprError> {
        let mut compiler = Compiler { schema, depth: 0 };
        let (node, ty) = compiler.compile(ast)?;
        Ok(Expr { node, ty })
    }

    /// The result type. An expression that is always NULL (e.g. a bare `NULL` literal) reports
    /// `VARCHAR`.
    pub fn data_type(&self) -> DataType {
        self.ty.unwrap_or(DataType::String)
    }

    /// Evaluates on one row (values in schema order).
    pub fn eval(&self, row: &[Value]) -> Result<Value, EvalError> {
        self.node.eval(row)
    }

    /// If this expression is a bare column reference, its index (lets callers skip evaluation).
    pub fn as_column(&self) -> Option<usize> {
        match self.node {
            Node::Column(i) => Some(i),
            _ => None,
        }
    }
}

/// Parses a comma-separated SELECT list such as `"k, score * 2 AS doubled, ts"` into
/// (output name, parsed expression) pairs.
///
/// The output name is the alias if given, else the column name of a bare column reference; other
/// expressions without an alias are an error asking for `AS name`. Output names must be unique
/// (case-insensitively, as column lookups are). Function calls with `*` (`COUNT(*)`) parse, so this
/// also serves aggregate lists.
pub fn parse_select_list(sql: &str) -> Result<Vec<(String, ast::Expr)>, ExprError> {
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect).try_with_sql(sql).map_err(|e| parse_error("select list", sql, e))?;
    let items = parser.parse_projection().map_err(|e| parse_error("select list", sql, e))?;
    expect_end(&parser, "select list", sql)?;
    let mut out: Vec<(String, ast::Expr)> = Vec::with_capacity(items.len());
    // Lower-cased names seen so far: a linear check, whatever the length of the list.
    let mut names = std::collections::HashSet::with_capacity(items.len());
    for item in items {
        let (name, expr) = match item {
            ast::SelectItem::ExprWithAlias { expr, alias } => (alias.value, expr),
            ast::SelectItem::UnnamedExpr(expr) => match &expr {
                ast::Expr::Identifier(ident) => (ident.value.clone(), expr),
                ast::Expr::CompoundIdentifier(parts) if !parts.is_empty() => (parts[parts.len() - 1].value.clone(), expr),
                _ => return Err(ExprError::MissingName(expr.to_string())),
            },
            ast::SelectItem::ExprWithAliases { expr, .. } => {
                return Err(ExprError::Unsupported(format!("multiple aliases for `{expr}`; write `{expr} AS name`")))
            }
            ast::SelectItem::Wildcard(_) | ast::SelectItem::QualifiedWildcard(..) => {
                return Err(ExprError::Unsupported(format!("`*` in the select list `{sql}`; list the columns explicitly")))
            }
        };
        if !names.insert(name.to_ascii_lowercase()) {
            return Err(ExprError::Unsupported(format!(
                "duplicate output name `{name}` in `{sql}`; give each expression a distinct name with `AS`"
            )));
        }
        out.push((name, expr));
    }
    Ok(out)
}

/// Parses a single SQL expression into sqlparser's AST (generic dialect). The whole input must be
/// one expression.
pub fn parse_expr(sql: &str) -> Result<ast::Expr, ExprError> {
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect).try_with_sql(sql).map_err(|e| parse_error("expression", sql, e))?;
    let expr = parser.parse_expr().map_err(|e| parse_error("expression", sql, e))?;
    expect_end(&parser, "expression", sql)?;
    Ok(expr)
}

fn parse_error(what: &str, sql: &str, err: ParserError) -> ExprError {
    let msg = match err {
        ParserError::TokenizerError(m) | ParserError::ParserError(m) => m,
        ParserError::RecursionLimitExceeded => "expression is nested too deeply".to_string(),
    };
    if sql.trim().is_empty() {
        return ExprError::Parse(format!("empty SQL {what}"));
    }
    ExprError::Parse(format!("cannot parse SQL {what} `{sql}`: {msg}"))
}

fn expect_end(parser: &Parser<'_>, what: &str, sql: &str) -> Result<(), ExprError> {
    let next = parser.peek_token();
    if next.token == Token::EOF {
        Ok(())
    } else {
        Err(ExprError::Parse(format!("cannot parse SQL {what} `{sql}`: unexpected `{}` after the end of the {what}", next.token)))
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled form
// ---------------------------------------------------------------------------------------------

/// A static type; `None` is the type of a NULL literal, which unifies with every type.
type Ty = Option<DataType>;

fn ty_name(ty: Ty) -> String {
    match ty {
        Some(t) => t.to_string(),
        None => "NULL".to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

impl ArithOp {
    fn symbol(self) -> &'static str {
        match self {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
            ArithOp::Mod => "%",
        }
    }
}

/// Operand types of an arithmetic node, fixed at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArithMode {
    /// `BIGINT op BIGINT → BIGINT`.
    Int,
    /// Numeric operands, at least one `DOUBLE` → `DOUBLE`.
    Float,
    /// `TIMESTAMP ± BIGINT → TIMESTAMP`.
    TsInt,
    /// `BIGINT + TIMESTAMP → TIMESTAMP`.
    IntTs,
    /// `TIMESTAMP - TIMESTAMP → BIGINT` (milliseconds).
    TsTs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

impl CmpOp {
    fn test(self, ord: Ordering) -> bool {
        match self {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::NotEq => ord != Ordering::Equal,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::LtEq => ord != Ordering::Greater,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::GtEq => ord != Ordering::Less,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrFn {
    Lower,
    Upper,
}

/// One element of a LIKE pattern.
#[derive(Debug, Clone, PartialEq)]
enum LikeTok {
    Char(char),
    /// `_`
    One,
    /// `%`
    Many,
}

#[derive(Debug, Clone)]
enum LikePattern {
    Const(Vec<LikeTok>),
    Dynamic(Box<Node>),
}

#[derive(Debug, Clone)]
enum Node {
    Column(usize),
    Literal(Value),
    Neg(Box<Node>),
    Arith {
        op: ArithOp,
        mode: ArithMode,
        l: Box<Node>,
        r: Box<Node>,
    },
    Cmp {
        op: CmpOp,
        l: Box<Node>,
        r: Box<Node>,
    },
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Not(Box<Node>),
    IsNull {
        expr: Box<Node>,
        negated: bool,
    },
    /// `IS [NOT] TRUE / FALSE / UNKNOWN`: `(value == want) != negated`.
    IsBool {
        expr: Box<Node>,
        want: Option<bool>,
        negated: bool,
    },
    DistinctFrom {
        l: Box<Node>,
        r: Box<Node>,
        negated: bool,
    },
    Between {
        expr: Box<Node>,
        low: Box<Node>,
        high: Box<Node>,
        negated: bool,
    },
    InList {
        expr: Box<Node>,
        list: Vec<Node>,
        negated: bool,
    },
    Like {
        expr: Box<Node>,
        pattern: LikePattern,
        negated: bool,
        case_insensitive: bool,
    },
    /// Searched CASE: the first branch whose condition is TRUE.
    Case {
        whens: Vec<(Node, Node)>,
        else_: Option<Box<Node>>,
    },
    /// Simple CASE: the first branch whose value equals the operand.
    CaseSimple {
        operand: Box<Node>,
        whens: Vec<(Node, Node)>,
        else_: Option<Box<Node>>,
    },
    Coalesce(Vec<Node>),
    NullIf(Box<Node>, Box<Node>),
    Cast {
        expr: Box<Node>,
        to: DataType,
        lenient: bool,
    },
    /// Implicit `BIGINT → DOUBLE` coercion (CASE/COALESCE branches).
    ToFloat(Box<Node>),
    Round {
        expr: Box<Node>,
        digits: Option<Box<Node>>,
    },
    FloorCeil {
        expr: Box<Node>,
        ceil: bool,
    },
    Abs(Box<Node>),
    Str(StrFn, Box<Node>),
    Length(Box<Node>),
    /// `a || b`: NULL if either side is NULL.
    Concat(Box<Node>, Box<Node>),
    /// `CONCAT(a, …)`: NULL arguments are skipped.
    ConcatFn(Vec<Node>),
}

// ---------------------------------------------------------------------------------------------
// Compilation
// ---------------------------------------------------------------------------------------------

struct Compiler<'a> {
    schema: &'a Schema,
    depth: usize,
}

fn mismatch(msg: String) -> ExprError {
    ExprError::TypeMismatch(msg)
}

fn unsupported(msg: String) -> ExprError {
    ExprError::Unsupported(msg)
}

/// Whether values of the two types can be compared.
fn comparable(a: Ty, b: Ty) -> bool {
    match (a, b) {
        (None, _) | (_, None) => true,
        (Some(x), Some(y)) => x == y || (x.is_numeric() && y.is_numeric()),
    }
}

/// The common type of CASE branches / COALESCE arguments, or `Err(())` if there is none.
fn unify(a: Ty, b: Ty) -> Result<Ty, ()> {
    match (a, b) {
        (None, t) | (t, None) => Ok(t),
        (Some(x), Some(y)) if x == y => Ok(Some(x)),
        (Some(x), Some(y)) if x.is_numeric() && y.is_numeric() => Ok(Some(DataType::Float)),
        _ => Err(()),
    }
}

/// Converts a node of type `from` to `to` where the conversion is implicit (only BIGINT → DOUBLE).
fn coerce(node: Node, from: Ty, to: Ty) -> Node {
    match (from, to) {
        (Some(DataType::Int), Some(DataType::Float)) => match node {
            Node::Literal(Value::Int(i)) => Node::Literal(Value::Float(i as f64)),
            other => Node::ToFloat(Box::new(other)),
        },
        _ => node,
    }
}

impl Compiler<'_> {
    fn compile(&mut self, e: &ast::Expr) -> Result<(Node, Ty), ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(unsupported(format!("expression is nested more than {MAX_DEPTH} levels deep")));
        }
        let out = self.compile_inner(e);
        self.depth -= 1;
        out
    }

    fn boxed(&mut self, e: &ast::Expr) -> Result<(Box<Node>, Ty), ExprError> {
        let (n, t) = self.compile(e)?;
        Ok((Box::new(n), t))
    }

    // Kept small: every arm delegates, so that the recursion's stack frames stay small even in
    // debug builds.
    fn compile_inner(&mut self, e: &ast::Expr) -> Result<(Node, Ty), ExprError> {
        use ast::Expr as E;
        match e {
            E::Identifier(ident) => self.column(ident),
            E::Nested(inner) => self.compile(inner),
            E::Value(v) => literal(&v.value, false),
            E::TypedString(ts) => typed_string(ts),
            E::UnaryOp { op, expr } => self.unary(*op, expr, e),
            E::BinaryOp { left, op, right } => self.binary(left, op, right),
            E::IsNull(inner) => self.is_null(inner, false),
            E::IsNotNull(inner) => self.is_null(inner, true),
            E::IsTrue(inner) => self.is_bool(inner, Some(true), false, "IS TRUE"),
            E::IsNotTrue(inner) => self.is_bool(inner, Some(true), true, "IS NOT TRUE"),
            E::IsFalse(inner) => self.is_bool(inner, Some(false), false, "IS FALSE"),
            E::IsNotFalse(inner) => self.is_bool(inner, Some(false), true, "IS NOT FALSE"),
            E::IsUnknown(inner) => self.is_bool(inner, None, false, "IS UNKNOWN"),
            E::IsNotUnknown(inner) => self.is_bool(inner, None, true, "IS NOT UNKNOWN"),
            E::IsDistinctFrom(l, r) => self.distinct_from(l, r, false),
            E::IsNotDistinctFrom(l, r) => self.distinct_from(l, r, true),
            E::Between { expr, negated, low, high } => self.between(expr, *negated, low, high),
            E::In { expr, target: ast::InTarget::List(items), negated, .. } => self.in_list(expr, items, *negated),
            E::Like { negated, any, expr, pattern, escape_char } => {
                self.like(e, *negated, *any, expr, pattern, escape_char.is_some(), false)
            }
            E::ILike { negated, any, expr, pattern, escape_char } => {
                self.like(e, *negated, *any, expr, pattern, escape_char.is_some(), true)
            }
            E::Case { operand, conditions, else_result, .. } => self.case(operand.as_deref(), conditions, else_result.as_deref()),
            E::Cast { kind, expr, data_type, format: None } => self.cast(kind, expr, data_type),
            E::Floor { expr, field } => self.floor_ceil(e, expr, field, false),
            E::Ceil { expr, field } => self.floor_ceil(e, expr, field, true),
            E::Function(f) => self.function(f, e),
            _ => Err(unsupported_expr(e)),
        }
    }

    fn is_null(&mut self, inner: &ast::Expr, negated: bool) -> Result<(Node, Ty), ExprError> {
        let (n, _) = self.boxed(inner)?;
        Ok((Node::IsNull { expr: n, negated }, Some(DataType::Bool)))
    }

    fn distinct_from(&mut self, l: &ast::Expr, r: &ast::Expr, negated: bool) -> Result<(Node, Ty), ExprError> {
        let op = if negated { "IS NOT DISTINCT FROM" } else { "IS DISTINCT FROM" };
        let (l, r) = self.comparison_operands(l, r, op)?;
        Ok((Node::DistinctFrom { l: Box::new(l), r: Box::new(r), negated }, Some(DataType::Bool)))
    }

    fn between(&mut self, expr: &ast::Expr, negated: bool, low: &ast::Expr, high: &ast::Expr) -> Result<(Node, Ty), ExprError> {
        let op = if negated { "NOT BETWEEN" } else { "BETWEEN" };
        let (en, et) = self.compile(expr)?;
        let (ln, lt) = self.compile(low)?;
        let (hn, ht) = self.compile(high)?;
        let ln = check_comparable(et, ln, lt, op)?;
        let hn = check_comparable(et, hn, ht, op)?;
        Ok((Node::Between { expr: Box::new(en), low: Box::new(ln), high: Box::new(hn), negated }, Some(DataType::Bool)))
    }

    fn in_list(&mut self, expr: &ast::Expr, items: &[ast::Expr], negated: bool) -> Result<(Node, Ty), ExprError> {
        let op = if negated { "NOT IN" } else { "IN" };
        let (en, et) = self.compile(expr)?;
        let mut list = Vec::with_capacity(items.len());
        for item in items {
            let (n, t) = self.compile(item)?;
            list.push(check_comparable(et, n, t, op)?);
        }
        Ok((Node::InList { expr: Box::new(en), list, negated }, Some(DataType::Bool)))
    }

    fn cast(&mut self, kind: &ast::CastKind, expr: &ast::Expr, data_type: &ast::DataType) -> Result<(Node, Ty), ExprError> {
        let to = cast_target(data_type)?;
        let lenient = matches!(kind, ast::CastKind::TryCast | ast::CastKind::SafeCast);
        let (n, t) = self.compile(expr)?;
        cast_node(n, t, to, lenient)
    }

    fn floor_ceil(&mut self, whole: &ast::Expr, expr: &ast::Expr, field: &ast::CeilFloorKind, ceil: bool) -> Result<(Node, Ty), ExprError> {
        let name = if ceil { "CEIL" } else { "FLOOR" };
        if !matches!(field, ast::CeilFloorKind::DateTimeField(ast::DateTimeField::NoDateTime)) {
            return Err(unsupported(format!("`{whole}`: {name} takes a single numeric argument, e.g. `{name}(x)`")));
        }
        let (n, t) = self.compile(expr)?;
        floor_ceil_node(name, n, t)
    }

    fn column(&self, ident: &ast::Ident) -> Result<(Node, Ty), ExprError> {
        let fields = &self.schema.fields;
        let idx = if ident.quote_style.is_some() {
            fields.iter().position(|f| f.name == ident.value).or_else(|| self.schema.index_of(&ident.value))
        } else {
            self.schema.index_of(&ident.value)
        };
        match idx {
            Some(i) => Ok((Node::Column(i), Some(fields[i].data_type))),
            None => Err(ExprError::UnknownColumn {
                name: ident.value.clone(),
                available: if fields.is_empty() { "(none)".to_string() } else { self.schema.names() },
                double_quoted: ident.quote_style == Some('"'),
            }),
        }
    }

    fn unary(&mut self, op: UnaryOperator, inner: &ast::Expr, whole: &ast::Expr) -> Result<(Node, Ty), ExprError> {
        match op {
            UnaryOperator::Minus => {
                // Fold `-<number>` so that `-9223372036854775808` is a valid BIGINT literal.
                if let ast::Expr::Value(v) = inner {
                    if matches!(v.value, ast::Value::Number(..)) {
                        return literal(&v.value, true);
                    }
                }
                let (n, t) = self.compile(inner)?;
                match t {
                    None | Some(DataType::Int) | Some(DataType::Float) => match n {
                        Node::Literal(Value::Float(f)) => Ok((Node::Literal(Value::Float(-f)), t)),
                        Node::Literal(Value::Int(i)) if i != i64::MIN => Ok((Node::Literal(Value::Int(-i)), t)),
                        n => Ok((Node::Neg(Box::new(n)), t)),
                    },
                    Some(other) => Err(mismatch(format!("cannot apply unary `-` to {other}"))),
                }
            }
            UnaryOperator::Plus => {
                let (n, t) = self.compile(inner)?;
                match t {
                    None | Some(DataType::Int) | Some(DataType::Float) => Ok((n, t)),
                    Some(other) => Err(mismatch(format!("cannot apply unary `+` to {other}"))),
                }
            }
            UnaryOperator::Not => {
                let (n, t) = self.boxed(inner)?;
                match t {
                    None | Some(DataType::Bool) => Ok((Node::Not(n), Some(DataType::Bool))),
                    Some(other) => Err(mismatch(format!("cannot apply `NOT` to {other}; expected BOOLEAN"))),
                }
            }
            _ => Err(unsupported(format!("operator `{op}` in `{whole}`"))),
        }
    }

    fn binary(&mut self, left: &ast::Expr, op: &BinaryOperator, right: &ast::Expr) -> Result<(Node, Ty), ExprError> {
        if binary_kind(op).is_none() {
            return Err(unsupported_binary(left, op, right));
        }
        let (l, lt) = self.compile(left)?;
        let (r, rt) = self.compile(right)?;
        binary_node(op, l, lt, r, rt)
    }

    /// Compiles both sides of a comparison and checks they are comparable.
    fn comparison_operands(&mut self, left: &ast::Expr, right: &ast::Expr, op: &str) -> Result<(Node, Node), ExprError> {
        let (l, lt) = self.compile(left)?;
        let (r, rt) = self.compile(right)?;
        comparison_pair(l, lt, r, rt, op)
    }

    fn is_bool(&mut self, inner: &ast::Expr, want: Option<bool>, negated: bool, op: &str) -> Result<(Node, Ty), ExprError> {
        let (n, t) = self.boxed(inner)?;
        if !matches!(t, None | Some(DataType::Bool)) {
            return Err(mismatch(format!("cannot apply `{op}` to {}; expected BOOLEAN", ty_name(t))));
        }
        Ok((Node::IsBool { expr: n, want, negated }, Some(DataType::Bool)))
    }

    #[allow(clippy::too_many_arguments)]
    fn like(
        &mut self,
        whole: &ast::Expr,
        negated: bool,
        any: bool,
        expr: &ast::Expr,
        pattern: &ast::Expr,
        has_escape: bool,
        case_insensitive: bool,
    ) -> Result<(Node, Ty), ExprError> {
        if any || has_escape {
            return Err(unsupported(format!("`{whole}`: only `x LIKE 'pattern'` (with `%` and `_`) is supported")));
        }
        let op = match (case_insensitive, negated) {
            (false, false) => "LIKE",
            (false, true) => "NOT LIKE",
            (true, false) => "ILIKE",
            (true, true) => "NOT ILIKE",
        };
        let (en, et) = self.boxed(expr)?;
        let (pn, pt) = self.compile(pattern)?;
        let texty = |t: Ty| matches!(t, None | Some(DataType::String));
        if !texty(et) || !texty(pt) {
            return Err(mismatch(format!("cannot apply `{op}` to {} and {}; expected VARCHAR operands", ty_name(et), ty_name(pt))));
        }
        let pattern = match pn {
            Node::Literal(Value::String(s)) => {
                let s = if case_insensitive { Cow::Owned(s.to_lowercase()) } else { Cow::Borrowed(&*s) };
                LikePattern::Const(compile_like(&s))
            }
            other => LikePattern::Dynamic(Box::new(other)),
        };
        Ok((Node::Like { expr: en, pattern, negated, case_insensitive }, Some(DataType::Bool)))
    }

    fn case(
        &mut self,
        operand: Option<&ast::Expr>,
        conditions: &[ast::CaseWhen],
        else_result: Option<&ast::Expr>,
    ) -> Result<(Node, Ty), ExprError> {
        let operand = match operand {
            Some(o) => Some(self.compile(o)?),
            None => None,
        };
        let mut whens = Vec::with_capacity(conditions.len());
        let mut result_ty: Ty = None;
        let mut types = Vec::with_capacity(conditions.len() + 1);
        for cw in conditions {
            let (cn, ct) = self.compile(&cw.condition)?;
            let cn = match &operand {
                Some((_, ot)) => check_comparable(*ot, cn, ct, "CASE … WHEN")?,
                None => {
                    if !matches!(ct, None | Some(DataType::Bool)) {
                        return Err(mismatch(format!("CASE WHEN condition `{}` must be BOOLEAN, found {}", cw.condition, ty_name(ct))));
                    }
                    cn
                }
            };
            let (rn, rt) = self.compile(&cw.result)?;
            result_ty = unify(result_ty, rt).map_err(|()| {
                mismatch(format!(
                    "CASE branches have incompatible types {} and {} (at `THEN {}`)",
                    ty_name(result_ty),
                    ty_name(rt),
                    cw.result
                ))
            })?;
            types.push(rt);
            whens.push((cn, rn));
        }
        let else_ = match else_result {
            Some(e) => {
                let (n, t) = self.compile(e)?;
                result_ty = unify(result_ty, t).map_err(|()| {
                    mismatch(format!("CASE branches have incompatible types {} and {} (at `ELSE {e}`)", ty_name(result_ty), ty_name(t)))
                })?;
                Some(Box::new(coerce(n, t, result_ty)))
            }
            None => None,
        };
        let whens = whens.into_iter().zip(types).map(|((c, r), t)| (c, coerce(r, t, result_ty))).collect();
        let node = match operand {
            Some((on, _)) => Node::CaseSimple { operand: Box::new(on), whens, else_ },
            None => Node::Case { whens, else_ },
        };
        Ok((node, result_ty))
    }

    fn function(&mut self, f: &ast::Function, whole: &ast::Expr) -> Result<(Node, Ty), ExprError> {
        let name = match f.name.0.last() {
            Some(ast::ObjectNamePart::Identifier(id)) if f.name.0.len() == 1 => id.value.to_ascii_uppercase(),
            _ => return Err(unsupported(format!("function `{}`; supported functions: {SUPPORTED_FUNCTIONS}", f.name))),
        };
        if is_aggregate(&name) {
            return Err(unsupported(format!(
                "aggregate function `{whole}` in a scalar expression; aggregates are only allowed in an \
                 aggregation list"
            )));
        }
        const KNOWN: [&str; 13] = [
            "ROUND",
            "COALESCE",
            "NULLIF",
            "CONCAT",
            "ABS",
            "FLOOR",
            "CEIL",
            "CEILING",
            "LOWER",
            "UPPER",
            "LENGTH",
            "CHAR_LENGTH",
            "CHARACTER_LENGTH",
        ];
        if !KNOWN.contains(&name.as_str()) {
            return Err(unsupported(format!("function `{}`; supported functions: {SUPPORTED_FUNCTIONS}", f.name)));
        }
        if f.over.is_some() {
            return Err(unsupported(format!("window function `{whole}`")));
        }
        if f.filter.is_some() || !f.within_group.is_empty() || f.null_treatment.is_some() {
            return Err(unsupported(format!("`{whole}`: FILTER / WITHIN GROUP / NULLS clauses")));
        }
        if !matches!(f.parameters, ast::FunctionArguments::None) {
            return Err(unsupported(format!("parameterized function call `{whole}`")));
        }
        let arg_exprs: Vec<&ast::Expr> = match &f.args {
            ast::FunctionArguments::None => return Err(unsupported(format!("`{whole}`; supported functions: {SUPPORTED_FUNCTIONS}"))),
            ast::FunctionArguments::Subquery(_) => {
                return Err(unsupported(format!("subquery in `{whole}`")));
            }
            ast::FunctionArguments::List(list) => {
                if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
                    return Err(unsupported(format!("`{whole}`: DISTINCT / ORDER BY / other clauses in arguments")));
                }
                let mut v = Vec::with_capacity(list.args.len());
                for a in &list.args {
                    match a {
                        ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)) => v.push(e),
                        ast::FunctionArg::Unnamed(_) => {
                            return Err(unsupported(format!("`*` argument in `{whole}`")));
                        }
                        _ => return Err(unsupported(format!("named argument in `{whole}`"))),
                    }
                }
                v
            }
        };
        let arity = |ok: bool, expected: &str| -> Result<(), ExprError> {
            if ok {
                Ok(())
            } else {
                Err(mismatch(format!("{name} takes {expected}, got {} in `{whole}`", arg_exprs.len())))
            }
        };
        let mut args = Vec::with_capacity(arg_exprs.len());
        for a in &arg_exprs {
            args.push(self.compile(a)?);
        }
        let n_args = args.len();
        match name.as_str() {
            "ROUND" => {
                arity(n_args == 1 || n_args == 2, "1 or 2 arguments (value [, decimals])")?;
                let mut it = args.into_iter();
                let (x, xt) = it.next().expect("checked arity");
                if !matches!(xt, None | Some(DataType::Int) | Some(DataType::Float)) {
                    return Err(mismatch(format!("ROUND expects a numeric value (BIGINT or DOUBLE), found {}", ty_name(xt))));
                }
                let digits = match it.next() {
                    Some((d, dt)) => {
                        if !matches!(dt, None | Some(DataType::Int)) {
                            return Err(mismatch(format!("ROUND expects a BIGINT number of decimals, found {}", ty_name(dt))));
                        }
                        Some(Box::new(d))
                    }
                    None => None,
                };
                if xt == Some(DataType::Int) && digits.is_none() {
                    return Ok((x, xt));
                }
                Ok((Node::Round { expr: Box::new(x), digits }, xt))
            }
            "COALESCE" => {
                arity(n_args >= 1, "at least 1 argument")?;
                let mut ty: Ty = None;
                for (i, (_, t)) in args.iter().enumerate() {
                    ty = unify(ty, *t).map_err(|()| {
                        mismatch(format!(
                            "COALESCE arguments have incompatible types {} and {} (argument {} `{}`)",
                            ty_name(ty),
                            ty_name(*t),
                            i + 1,
                            arg_exprs[i]
                        ))
                    })?;
                }
                let nodes = args.into_iter().map(|(n, t)| coerce(n, t, ty)).collect();
                Ok((Node::Coalesce(nodes), ty))
            }
            "NULLIF" => {
                arity(n_args == 2, "2 arguments")?;
                let mut it = args.into_iter();
                let (a, at) = it.next().expect("checked arity");
                let (b, bt) = it.next().expect("checked arity");
                let b = check_comparable(at, b, bt, "NULLIF")?;
                Ok((Node::NullIf(Box::new(a), Box::new(b)), at))
            }
            "CONCAT" => {
                arity(n_args >= 1, "at least 1 argument")?;
                Ok((Node::ConcatFn(args.into_iter().map(|(n, _)| n).collect()), Some(DataType::String)))
            }
            "ABS" => {
                arity(n_args == 1, "1 argument")?;
                let (x, xt) = args.pop().expect("checked arity");
                if !matches!(xt, None | Some(DataType::Int) | Some(DataType::Float)) {
                    return Err(mismatch(format!("ABS expects a numeric argument (BIGINT or DOUBLE), found {}", ty_name(xt))));
                }
                Ok((Node::Abs(Box::new(x)), xt))
            }
            "FLOOR" | "CEIL" | "CEILING" => {
                arity(n_args == 1, "1 argument")?;
                let (x, xt) = args.pop().expect("checked arity");
                floor_ceil_node(if name == "FLOOR" { "FLOOR" } else { "CEIL" }, x, xt)
            }
            "LOWER" | "UPPER" | "LENGTH" | "CHAR_LENGTH" | "CHARACTER_LENGTH" => {
                arity(n_args == 1, "1 argument")?;
                let (x, xt) = args.pop().expect("checked arity");
                if !matches!(xt, None | Some(DataType::String)) {
                    return Err(mismatch(format!("{name} expects a VARCHAR argument, found {}", ty_name(xt))));
                }
                Ok(match name.as_str() {
                    "LOWER" => (Node::Str(StrFn::Lower, Box::new(x)), Some(DataType::String)),
                    "UPPER" => (Node::Str(StrFn::Upper, Box::new(x)), Some(DataType::String)),
                    _ => (Node::Length(Box::new(x)), Some(DataType::Int)),
                })
            }
            _ => Err(unsupported(format!("function `{}`; supported functions: {SUPPORTED_FUNCTIONS}", f.name))),
        }
    }
}

/// The binary operators the compiler handles.
#[derive(Clone, Copy)]
enum BinaryKind {
    Arith(ArithOp),
    Cmp(CmpOp),
    And,
    Or,
    Concat,
}

fn binary_kind(op: &BinaryOperator) -> Option<BinaryKind> {
    Some(match op {
        BinaryOperator::Plus => BinaryKind::Arith(ArithOp::Add),
        BinaryOperator::Minus => BinaryKind::Arith(ArithOp::Sub),
        BinaryOperator::Multiply => BinaryKind::Arith(ArithOp::Mul),
        BinaryOperator::Divide => BinaryKind::Arith(ArithOp::Div),
        BinaryOperator::Modulo => BinaryKind::Arith(ArithOp::Mod),
        BinaryOperator::Eq => BinaryKind::Cmp(CmpOp::Eq),
        BinaryOperator::NotEq => BinaryKind::Cmp(CmpOp::NotEq),
        BinaryOperator::Lt => BinaryKind::Cmp(CmpOp::Lt),
        BinaryOperator::LtEq => BinaryKind::Cmp(CmpOp::LtEq),
        BinaryOperator::Gt => BinaryKind::Cmp(CmpOp::Gt),
        BinaryOperator::GtEq => BinaryKind::Cmp(CmpOp::GtEq),
        BinaryOperator::And => BinaryKind::And,
        BinaryOperator::Or => BinaryKind::Or,
        BinaryOperator::StringConcat => BinaryKind::Concat,
        _ => return None,
    })
}

fn unsupported_binary(left: &ast::Expr, op: &BinaryOperator, right: &ast::Expr) -> ExprError {
    unsupported(format!("operator `{op}` in `{left} {op} {right}`"))
}

/// Type-checks a binary operation on compiled operands.
fn binary_node(op: &BinaryOperator, l: Node, lt: Ty, r: Node, rt: Ty) -> Result<(Node, Ty), ExprError> {
    let Some(kind) = binary_kind(op) else {
        return Err(unsupported(format!("operator `{op}`")));
    };
    match kind {
        BinaryKind::Arith(aop) => {
            let (mode, ty) = arith_type(aop, lt, rt)
                .ok_or_else(|| mismatch(format!("cannot apply `{}` to {} and {}", aop.symbol(), ty_name(lt), ty_name(rt))))?;
            Ok((Node::Arith { op: aop, mode, l: Box::new(l), r: Box::new(r) }, ty))
        }
        BinaryKind::Cmp(cop) => {
            let (l, r) = comparison_pair(l, lt, r, rt, &op.to_string())?;
            Ok((Node::Cmp { op: cop, l: Box::new(l), r: Box::new(r) }, Some(DataType::Bool)))
        }
        BinaryKind::And | BinaryKind::Or => {
            let is_bool = |t: Ty| matches!(t, None | Some(DataType::Bool));
            if !is_bool(lt) || !is_bool(rt) {
                return Err(mismatch(format!("cannot apply `{op}` to {} and {}; expected BOOLEAN operands", ty_name(lt), ty_name(rt))));
            }
            let (l, r) = (Box::new(l), Box::new(r));
            let node = if matches!(kind, BinaryKind::And) { Node::And(l, r) } else { Node::Or(l, r) };
            Ok((node, Some(DataType::Bool)))
        }
        BinaryKind::Concat => {
            let texty = |t: Ty| matches!(t, None | Some(DataType::String));
            if !texty(lt) && !texty(rt) {
                return Err(mismatch(format!(
                    "cannot apply `||` to {} and {}; at least one operand must be VARCHAR",
                    ty_name(lt),
                    ty_name(rt)
                )));
            }
            Ok((Node::Concat(Box::new(l), Box::new(r)), Some(DataType::String)))
        }
    }
}

/// Checks that two compiled operands can be compared, reading a string literal compared with a
/// TIMESTAMP as a timestamp (as PostgreSQL does).
fn comparison_pair(l: Node, lt: Ty, r: Node, rt: Ty, op: &str) -> Result<(Node, Node), ExprError> {
    let l = timestamp_literal(l, lt, rt)?;
    let r = timestamp_literal(r, rt, lt)?;
    let (lt, rt) = (retype(&l, lt), retype(&r, rt));
    if !comparable(lt, rt) {
        return Err(mismatch(format!("cannot apply `{op}` to {} and {}", ty_name(lt), ty_name(rt))));
    }
    Ok((l, r))
}

/// The error for an AST node the compiler does not handle.
fn unsupported_expr(e: &ast::Expr) -> ExprError {
    use ast::Expr as E;
    match e {
        E::CompoundIdentifier(parts) => {
            let last = parts.last().map(|p| p.value.as_str()).unwrap_or_default();
            unsupported(format!("qualified column name `{e}`; refer to the column as `{last}`"))
        }
        E::In { .. } => unsupported(format!("`{e}`: IN supports only a literal list such as `x IN (1, 2, 3)`")),
        E::Cast { .. } => unsupported(format!("CAST … FORMAT in `{e}`")),
        E::Interval(_) => unsupported(format!(
            "INTERVAL in `{e}`; timestamps are milliseconds, so add a BIGINT number of milliseconds \
             instead, e.g. `ts + 60000` for one minute"
        )),
        E::Subquery(_) | E::Exists { .. } => unsupported(format!("subquery in `{e}`; expressions see only the current row")),
        _ => unsupported(format!("expression `{e}`")),
    }
}

fn floor_ceil_node(name: &str, n: Node, t: Ty) -> Result<(Node, Ty), ExprError> {
    match t {
        Some(DataType::Int) => Ok((n, t)),
        None | Some(DataType::Float) => Ok((Node::FloorCeil { expr: Box::new(n), ceil: name != "FLOOR" }, t)),
        Some(other) => Err(mismatch(format!("{name} expects a numeric argument (BIGINT or DOUBLE), found {other}"))),
    }
}

/// Checks that `other` can be compared with a value of type `bt` (BETWEEN bounds, IN items, CASE
/// values, NULLIF).
fn check_comparable(bt: Ty, other: Node, ot: Ty, op: &str) -> Result<Node, ExprError> {
    let other = timestamp_literal(other, ot, bt)?;
    let ot = retype(&other, ot);
    if !comparable(bt, ot) {
        return Err(mismatch(format!("cannot apply `{op}` to {} and {}", ty_name(bt), ty_name(ot))));
    }
    Ok(other)
}

fn is_aggregate(upper_name: &str) -> bool {
    matches!(
        upper_name,
        "SUM"
            | "COUNT"
            | "AVG"
            | "MIN"
            | "MAX"
            | "STDDEV"
            | "STDDEV_POP"
            | "STDDEV_SAMP"
            | "VARIANCE"
            | "VAR_POP"
            | "VAR_SAMP"
            | "FIRST_VALUE"
            | "LAST_VALUE"
            | "ARRAY_AGG"
            | "STRING_AGG"
            | "BOOL_AND"
            | "BOOL_OR"
            | "EVERY"
            | "APPROX_COUNT_DISTINCT"
    )
}

/// The type of an arithmetic expression, or `None` if the operator does not apply.
fn arith_type(op: ArithOp, lt: Ty, rt: Ty) -> Option<(ArithMode, Ty)> {
    use DataType::{Float, Int, Timestamp as Ts};
    let additive = matches!(op, ArithOp::Add | ArithOp::Sub);
    Some(match (lt, rt) {
        (None, None) => (ArithMode::Int, None),
        (Some(Int), Some(Int)) | (Some(Int), None) | (None, Some(Int)) => (ArithMode::Int, Some(Int)),
        (Some(a), Some(b)) if a.is_numeric() && b.is_numeric() => (ArithMode::Float, Some(Float)),
        (Some(Float), None) | (None, Some(Float)) => (ArithMode::Float, Some(Float)),
        (Some(Ts), Some(Int)) | (Some(Ts), None) if additive => (ArithMode::TsInt, Some(Ts)),
        (Some(Int), Some(Ts)) if op == ArithOp::Add => (ArithMode::IntTs, Some(Ts)),
        (None, Some(Ts)) if op == ArithOp::Add => (ArithMode::IntTs, Some(Ts)),
        (Some(Ts), Some(Ts)) | (None, Some(Ts)) if op == ArithOp::Sub => (ArithMode::TsTs, Some(Int)),
        _ => return None,
    })
}

/// If `node` is a string literal and `other` is a TIMESTAMP, reads the literal as a timestamp.
fn timestamp_literal(node: Node, ty: Ty, other: Ty) -> Result<Node, ExprError> {
    if ty == Some(DataType::String) && other == Some(DataType::Timestamp) {
        if let Node::Literal(Value::String(s)) = &node {
            return match parse_timestamp(s) {
                Some(ms) => Ok(Node::Literal(Value::Timestamp(ms))),
                None => Err(ExprError::InvalidLiteral(format!(
                    "'{s}' compared with a TIMESTAMP is not a timestamp; expected 'YYYY-MM-DD[ HH:MM:SS[.fff]]'"
                ))),
            };
        }
    }
    Ok(node)
}

/// The type after [`timestamp_literal`] may have rewritten the node.
fn retype(node: &Node, ty: Ty) -> Ty {
    match node {
        Node::Literal(Value::Timestamp(_)) => Some(DataType::Timestamp),
        _ => ty,
    }
}

fn literal(v: &ast::Value, negate: bool) -> Result<(Node, Ty), ExprError> {
    let lit = |v: Value| {
        let t = v.data_type();
        Ok((Node::Literal(v), t))
    };
    match v {
        ast::Value::Number(s, _) => {
            let text = if negate { format!("-{s}") } else { s.clone() };
            let is_integer = s.bytes().all(|b| b.is_ascii_digit());
            if is_integer {
                match text.parse::<i64>() {
                    Ok(i) => lit(Value::Int(i)),
                    Err(_) => Err(ExprError::InvalidLiteral(format!(
                        "integer {text} is out of range for BIGINT; write it as a decimal (e.g. {text}.0) \
                         to get a DOUBLE"
                    ))),
                }
            } else {
                match text.parse::<f64>() {
                    Ok(f) => lit(Value::Float(f)),
                    Err(_) => Err(ExprError::InvalidLiteral(format!("cannot read number `{text}`"))),
                }
            }
        }
        ast::Value::Boolean(b) => lit(Value::Bool(*b)),
        ast::Value::Null => Ok((Node::Literal(Value::Null), None)),
        ast::Value::Placeholder(p) => Err(unsupported(format!("placeholder `{p}`"))),
        other => match other.clone().into_string() {
            Some(s) => lit(Value::string(&s)),
            None => Err(unsupported(format!("literal `{other}`"))),
        },
    }
}

fn typed_string(ts: &ast::TypedString) -> Result<(Node, Ty), ExprError> {
    let to = cast_target(&ts.data_type)?;
    let Some(text) = ts.value.value.clone().into_string() else {
        return Err(unsupported(format!("typed literal `{ts}`")));
    };
    match cast_value(Value::string(&text), to) {
        Ok(v) => Ok((Node::Literal(v), Some(to))),
        Err(e) => Err(ExprError::InvalidLiteral(format!("{e} (in `{ts}`)"))),
    }
}

/// Maps a SQL type name (as written in `CAST(x AS …)`) to a [`DataType`].
fn cast_target(dt: &ast::DataType) -> Result<DataType, ExprError> {
    let full = dt.to_string();
    let base = full.split('(').next().unwrap_or_default().trim();
    let found = DataType::parse(&full).or_else(|| DataType::parse(base)).or_else(|| {
        let lower = base.to_ascii_lowercase();
        if lower.starts_with("timestamp") {
            Some(DataType::Timestamp)
        } else if lower.starts_with("character") || lower.starts_with("varchar") || lower == "string" {
            Some(DataType::String)
        } else {
            None
        }
    });
    found.ok_or_else(|| unsupported(format!("type `{full}`; supported types: BOOLEAN, BIGINT, DOUBLE, VARCHAR, TIMESTAMP")))
}

fn cast_node(n: Node, from: Ty, to: DataType, lenient: bool) -> Result<(Node, Ty), ExprError> {
    use DataType::*;
    let Some(from) = from else {
        return Ok((Node::Literal(Value::Null), Some(to)));
    };
    if from == to {
        return Ok((n, Some(to)));
    }
    let allowed = matches!(
        (from, to),
        (String, _) | (_, String) | (Int, Float) | (Float, Int) | (Int, Bool) | (Bool, Int) | (Int, Timestamp) | (Timestamp, Int)
    );
    if !allowed {
        return Err(mismatch(format!("cannot CAST {from} to {to}")));
    }
    if from == Int && to == Float {
        return Ok((coerce(n, Some(Int), Some(Float)), Some(Float)));
    }
    Ok((Node::Cast { expr: Box::new(n), to, lenient }, Some(to)))
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

fn type_error(expected: &str, got: &Value) -> EvalError {
    EvalError(format!("internal type error: expected {expected}, got {got:?}"))
}

#[inline]
fn as_bool(v: &Value) -> Result<Option<bool>, EvalError> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        other => Err(type_error("BOOLEAN", other)),
    }
}

#[inline]
fn as_f64(v: &Value) -> Result<f64, EvalError> {
    match v {
        Value::Int(i) => Ok(*i as f64),
        Value::Float(f) => Ok(*f),
        other => Err(type_error("a number", other)),
    }
}

#[inline]
fn as_i64(v: &Value) -> Result<i64, EvalError> {
    match v {
        Value::Int(i) | Value::Timestamp(i) => Ok(*i),
        other => Err(type_error("BIGINT", other)),
    }
}

#[inline]
fn bool_value(b: Option<bool>) -> Value {
    match b {
        Some(b) => Value::Bool(b),
        None => Value::Null,
    }
}

/// Total order on doubles for comparisons: NaN equals NaN and sorts above everything (PostgreSQL).
fn cmp_f64(a: f64, b: f64) -> Ordering {
    match a.partial_cmp(&b) {
        Some(o) => o,
        None => a.is_nan().cmp(&b.is_nan()),
    }
}

/// Exact comparison of an integer with a double.
fn cmp_i64_f64(i: i64, f: f64) -> Ordering {
    if f.is_nan() {
        return Ordering::Less;
    }
    // 2^63 is exactly representable; every i64 is below it and at or above -2^63.
    if f >= 9_223_372_036_854_775_808.0 {
        return Ordering::Less;
    }
    if f < -9_223_372_036_854_775_808.0 {
        return Ordering::Greater;
    }
    let t = f.trunc();
    match i.cmp(&(t as i64)) {
        Ordering::Equal => 0.0_f64.partial_cmp(&(f - t)).unwrap_or(Ordering::Equal),
        o => o,
    }
}

/// Compares two values; `Ok(None)` if either is NULL.
fn compare(a: &Value, b: &Value) -> Result<Option<Ordering>, EvalError> {
    Ok(Some(match (a, b) {
        (Value::Null, _) | (_, Value::Null) => return Ok(None),
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        (Value::Float(x), Value::Float(y)) => cmp_f64(*x, *y),
        (Value::Int(x), Value::Float(y)) => cmp_i64_f64(*x, *y),
        (Value::Float(x), Value::Int(y)) => cmp_i64_f64(*y, *x).reverse(),
        (Value::String(x), Value::String(y)) => x.as_ref().cmp(y.as_ref()),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Timestamp(x), Value::Timestamp(y)) => x.cmp(y),
        _ => return Err(EvalError(format!("internal type error: cannot compare {a:?} with {b:?}"))),
    }))
}

fn overflow(op: ArithOp, a: i64, b: i64) -> EvalError {
    EvalError(format!("BIGINT overflow: {a} {} {b} is out of range", op.symbol()))
}

fn int_arith(op: ArithOp, a: i64, b: i64) -> Result<i64, EvalError> {
    let r = match op {
        ArithOp::Add => a.checked_add(b),
        ArithOp::Sub => a.checked_sub(b),
        ArithOp::Mul => a.checked_mul(b),
        ArithOp::Div => {
            if b == 0 {
                return Err(EvalError::new("division by zero"));
            }
            a.checked_div(b)
        }
        ArithOp::Mod => {
            if b == 0 {
                return Err(EvalError::new("division by zero"));
            }
            // i64::MIN % -1 is mathematically 0.
            Some(a.wrapping_rem(b))
        }
    };
    r.ok_or_else(|| overflow(op, a, b))
}

fn float_arith(op: ArithOp, a: f64, b: f64) -> Result<f64, EvalError> {
    Ok(match op {
        ArithOp::Add => a + b,
        ArithOp::Sub => a - b,
        ArithOp::Mul => a * b,
        ArithOp::Div => {
            if b == 0.0 {
                return Err(EvalError::new("division by zero"));
            }
            a / b
        }
        ArithOp::Mod => {
            if b == 0.0 {
                return Err(EvalError::new("division by zero"));
            }
            a % b
        }
    })
}

fn arith(op: ArithOp, mode: ArithMode, a: &Value, b: &Value) -> Result<Value, EvalError> {
    Ok(match mode {
        ArithMode::Int => Value::Int(int_arith(op, as_i64(a)?, as_i64(b)?)?),
        ArithMode::Float => Value::Float(float_arith(op, as_f64(a)?, as_f64(b)?)?),
        ArithMode::TsInt | ArithMode::IntTs => Value::Timestamp(int_arith(op, as_i64(a)?, as_i64(b)?)?),
        ArithMode::TsTs => Value::Int(int_arith(op, as_i64(a)?, as_i64(b)?)?),
    })
}

/// Text form of a value, as used by `CAST(x AS VARCHAR)` and `||`. `None` for NULL.
fn to_text(v: &Value) -> Option<Cow<'_, str>> {
    Some(match v {
        Value::Null => return None,
        Value::String(s) => Cow::Borrowed(&**s),
        Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Value::Int(i) => Cow::Owned(i.to_string()),
        Value::Float(f) => Cow::Owned(format_f64(*f)),
        Value::Timestamp(ms) => Cow::Owned(format_timestamp(*ms)),
    })
}

fn format_f64(f: f64) -> String {
    if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else {
        f.to_string()
    }
}

fn cast_error(s: &str, to: DataType) -> EvalError {
    EvalError(format!("cannot CAST '{s}' to {to}"))
}

fn f64_to_i64(f: f64) -> Result<i64, EvalError> {
    let r = f.round();
    if r.is_nan() || !(-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&r) {
        return Err(EvalError(format!("cannot CAST {} to BIGINT: out of range", format_f64(f))));
    }
    Ok(r as i64)
}

/// Runtime conversion for `CAST(v AS to)`; NULL stays NULL.
fn cast_value(v: Value, to: DataType) -> Result<Value, EvalError> {
    use DataType as T;
    Ok(match (v, to) {
        (Value::Null, _) => Value::Null,
        (v @ Value::Bool(_), T::Bool)
        | (v @ Value::Int(_), T::Int)
        | (v @ Value::Float(_), T::Float)
        | (v @ Value::String(_), T::String)
        | (v @ Value::Timestamp(_), T::Timestamp) => v,
        (Value::String(s), to) => {
            let t = s.trim();
            match to {
                T::Bool => match t.to_ascii_lowercase().as_str() {
                    "true" | "t" | "yes" | "y" | "on" | "1" => Value::Bool(true),
                    "false" | "f" | "no" | "n" | "off" | "0" => Value::Bool(false),
                    _ => return Err(cast_error(&s, to)),
                },
                T::Int => Value::Int(t.parse().map_err(|_| cast_error(&s, to))?),
                T::Float => Value::Float(t.parse().map_err(|_| cast_error(&s, to))?),
                T::Timestamp => Value::Timestamp(parse_timestamp(t).ok_or_else(|| {
                    EvalError(format!("cannot CAST '{s}' to TIMESTAMP: expected 'YYYY-MM-DD[ HH:MM:SS[.fff]][Z|±HH:MM]'"))
                })?),
                T::String => unreachable!("handled above"),
            }
        }
        (v, T::String) => Value::String(Arc::from(to_text(&v).unwrap_or_default())),
        (Value::Int(i), T::Float) => Value::Float(i as f64),
        (Value::Int(i), T::Bool) => Value::Bool(i != 0),
        (Value::Int(i), T::Timestamp) => Value::Timestamp(i),
        (Value::Float(f), T::Int) => Value::Int(f64_to_i64(f)?),
        (Value::Bool(b), T::Int) => Value::Int(i64::from(b)),
        (Value::Timestamp(ms), T::Int) => Value::Int(ms),
        (v, to) => return Err(EvalError(format!("cannot CAST {v:?} to {to}"))),
    })
}

const POW10: [f64; 23] =
    [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22];

/// Rounds to `n` decimal places (negative `n` rounds left of the point), half away from zero, on
/// the value's decimal digits to 15 significant places: as many as a double holds for any decimal
/// input, so the binary noise of arithmetic on decimal inputs is gone and ties round as SQL's
/// NUMERIC rounds them (`ROUND(1.005, 2)` is `1.01`, and `ROUND(10885 / 1000.0 / 311, 2)` is
/// `0.04` as in PostgreSQL, though the double computed is 0.034999999999999996).
fn round_f64(x: f64, n: i64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    let n = n.clamp(-400, 400);
    if (0..=22).contains(&n) {
        let p = POW10[n as usize];
        let y = x * p;
        // Far from a tie, the binary product rounds the same way as the decimal value; `y.round()`
        // and `p` are exact, so the quotient is the double nearest the decimal result.
        if y.abs() < 1e9 && (y.abs().fract() - 0.5).abs() > 1e-6 {
            return y.round() / p + 0.0;
        }
    }
    round_f64_decimal(x, n)
}

fn round_f64_decimal(x: f64, n: i64) -> f64 {
    // Fifteen significant digits: d.dddddddddddddd e±E, i.e. 0.dddd × 10^(E+1).
    let s = format!("{:.14e}", x.abs());
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i64 = exp.parse().unwrap_or(0);
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
    let keep = exp + 1 + n; // number of leading digits that survive
    if keep >= digits.len() as i64 {
        return x;
    }
    if keep < 0 {
        return 0.0;
    }
    let keep = keep as usize;
    let mut q: u64 = digits[..keep].iter().fold(0, |acc, d| acc * 10 + u64::from(*d));
    if digits[keep] >= 5 {
        q += 1;
    }
    let r: f64 = format!("{q}e{}", -n).parse().unwrap_or(0.0);
    (if x < 0.0 { -r } else { r }) + 0.0
}

fn round_i64(x: i64, n: i64) -> Result<i64, EvalError> {
    if n >= 0 {
        return Ok(x);
    }
    if n < -19 {
        return Ok(0);
    }
    let p = 10_i128.pow((-n) as u32);
    let a = i128::from(x).abs();
    let r = (a + p / 2) / p * p;
    let r = if x < 0 { -r } else { r };
    i64::try_from(r).map_err(|_| EvalError(format!("BIGINT overflow: ROUND({x}, {n}) is out of range")))
}

fn compile_like(pattern: &str) -> Vec<LikeTok> {
    let mut toks = Vec::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '%' => {
                if toks.last() == Some(&LikeTok::Many) {
                    continue;
                }
                LikeTok::Many
            }
            '_' => LikeTok::One,
            '\\' => LikeTok::Char(chars.next().unwrap_or('\\')),
            c => LikeTok::Char(c),
        });
    }
    toks
}

/// Wildcard match with single-star backtracking (linear in practice, O(n·m) worst case).
fn like_match(text: &str, pat: &[LikeTok]) -> bool {
    let text: Vec<char> = text.chars().collect();
    let (mut t, mut p) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None; // (pattern index after %, text index)
    while t < text.len() {
        match pat.get(p) {
            Some(LikeTok::Many) => {
                p += 1;
                star = Some((p, t));
            }
            Some(LikeTok::One) => {
                p += 1;
                t += 1;
            }
            Some(LikeTok::Char(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|tok| *tok == LikeTok::Many)
}

impl Node {
    // The common arms are evaluated inline; the rest delegate to helpers so that this recursive
    // function's stack frame stays small even in debug builds.
    fn eval(&self, row: &[Value]) -> Result<Value, EvalError> {
        match self {
            Node::Column(i) => match row.get(*i) {
                Some(v) => Ok(v.clone()),
                None => Err(short_row(row.len(), *i)),
            },
            Node::Literal(v) => Ok(v.clone()),
            Node::Arith { op, mode, l, r } => {
                let a = l.eval(row)?;
                if a.is_null() {
                    return Ok(Value::Null);
                }
                let b = r.eval(row)?;
                if b.is_null() {
                    return Ok(Value::Null);
                }
                arith(*op, *mode, &a, &b)
            }
            Node::Cmp { op, l, r } => {
                let a = l.eval(row)?;
                if a.is_null() {
                    return Ok(Value::Null);
                }
                let b = r.eval(row)?;
                Ok(bool_value(compare(&a, &b)?.map(|o| op.test(o))))
            }
            Node::And(l, r) => {
                let a = as_bool(&l.eval(row)?)?;
                if a == Some(false) {
                    return Ok(Value::Bool(false));
                }
                let b = as_bool(&r.eval(row)?)?;
                Ok(bool_value(match (a, b) {
                    (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                }))
            }
            Node::Or(l, r) => {
                let a = as_bool(&l.eval(row)?)?;
                if a == Some(true) {
                    return Ok(Value::Bool(true));
                }
                let b = as_bool(&r.eval(row)?)?;
                Ok(bool_value(match (a, b) {
                    (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                }))
            }
            Node::Not(e) => Ok(bool_value(as_bool(&e.eval(row)?)?.map(|b| !b))),
            Node::IsNull { expr, negated } => Ok(Value::Bool(expr.eval(row)?.is_null() != *negated)),
            Node::IsBool { expr, want, negated } => Ok(Value::Bool((as_bool(&expr.eval(row)?)? == *want) != *negated)),
            Node::Neg(e) => negate(e.eval(row)?),
            Node::DistinctFrom { l, r, negated } => distinct_from(l.eval(row)?, r.eval(row)?, *negated),
            Node::Between { expr, low, high, negated } => eval_between(row, expr, low, high, *negated),
            Node::InList { expr, list, negated } => eval_in_list(row, expr, list, *negated),
            Node::Like { expr, pattern, negated, case_insensitive } => eval_like(row, expr, pattern, *negated, *case_insensitive),
            Node::Case { whens, else_ } => eval_case(row, None, whens, else_.as_deref()),
            Node::CaseSimple { operand, whens, else_ } => eval_case(row, Some(operand), whens, else_.as_deref()),
            Node::Coalesce(args) => eval_coalesce(row, args),
            Node::NullIf(a, b) => eval_nullif(row, a, b),
            Node::Cast { expr, to, lenient } => match cast_value(expr.eval(row)?, *to) {
                Err(_) if *lenient => Ok(Value::Null),
                r => r,
            },
            Node::ToFloat(e) => Ok(match e.eval(row)? {
                Value::Int(i) => Value::Float(i as f64),
                other => other,
            }),
            Node::Round { expr, digits } => eval_round(row, expr, digits.as_deref()),
            Node::FloorCeil { expr, ceil } => Ok(match expr.eval(row)? {
                Value::Float(f) => Value::Float(if *ceil { f.ceil() } else { f.floor() } + 0.0),
                other => other,
            }),
            Node::Abs(e) => abs(e.eval(row)?),
            Node::Str(f, e) => Ok(string_fn(*f, e.eval(row)?)),
            Node::Length(e) => Ok(match e.eval(row)? {
                Value::String(s) => Value::Int(s.chars().count() as i64),
                other => other,
            }),
            Node::Concat(l, r) => concat2(l.eval(row)?, r, row),
            Node::ConcatFn(args) => eval_concat_fn(row, args),
        }
    }
}

fn short_row(len: usize, i: usize) -> EvalError {
    EvalError(format!("row has {len} values but the expression reads column #{}", i + 1))
}

fn negate(v: Value) -> Result<Value, EvalError> {
    Ok(match v {
        Value::Null => Value::Null,
        Value::Int(i) => Value::Int(i.checked_neg().ok_or_else(|| EvalError(format!("BIGINT overflow: -({i}) is out of range")))?),
        Value::Float(f) => Value::Float(-f),
        other => return Err(type_error("a number", &other)),
    })
}

fn abs(v: Value) -> Result<Value, EvalError> {
    Ok(match v {
        Value::Int(i) => Value::Int(i.checked_abs().ok_or_else(|| EvalError(format!("BIGINT overflow: ABS({i}) is out of range")))?),
        Value::Float(f) => Value::Float(f.abs()),
        other => other,
    })
}

fn string_fn(f: StrFn, v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(Arc::from(match f {
            StrFn::Lower => s.to_lowercase(),
            StrFn::Upper => s.to_uppercase(),
        })),
        other => other,
    }
}

fn distinct_from(a: Value, b: Value, negated: bool) -> Result<Value, EvalError> {
    let distinct = match (a.is_null(), b.is_null()) {
        (true, true) => false,
        (false, false) => compare(&a, &b)? != Some(Ordering::Equal),
        _ => true,
    };
    Ok(Value::Bool(distinct != negated))
}

fn eval_between(row: &[Value], expr: &Node, low: &Node, high: &Node, negated: bool) -> Result<Value, EvalError> {
    let v = expr.eval(row)?;
    if v.is_null() {
        return Ok(Value::Null);
    }
    let ge_low = compare(&v, &low.eval(row)?)?.map(|o| o != Ordering::Less);
    let le_high = compare(&v, &high.eval(row)?)?.map(|o| o != Ordering::Greater);
    let within = match (ge_low, le_high) {
        (Some(false), _) | (_, Some(false)) => Some(false),
        (Some(true), Some(true)) => Some(true),
        _ => None,
    };
    Ok(bool_value(within.map(|w| w != negated)))
}

fn eval_in_list(row: &[Value], expr: &Node, list: &[Node], negated: bool) -> Result<Value, EvalError> {
    let v = expr.eval(row)?;
    if v.is_null() {
        return Ok(Value::Null);
    }
    let mut saw_null = false;
    for item in list {
        match compare(&v, &item.eval(row)?)? {
            Some(Ordering::Equal) => return Ok(Value::Bool(!negated)),
            Some(_) => {}
            None => saw_null = true,
        }
    }
    Ok(if saw_null { Value::Null } else { Value::Bool(negated) })
}

fn eval_like(row: &[Value], expr: &Node, pattern: &LikePattern, negated: bool, case_insensitive: bool) -> Result<Value, EvalError> {
    let v = expr.eval(row)?;
    let text = match &v {
        Value::Null => return Ok(Value::Null),
        Value::String(s) => s,
        other => return Err(type_error("VARCHAR", other)),
    };
    let text: Cow<'_, str> = if case_insensitive { Cow::Owned(text.to_lowercase()) } else { Cow::Borrowed(text) };
    let matched = match pattern {
        LikePattern::Const(toks) => like_match(&text, toks),
        LikePattern::Dynamic(p) => match p.eval(row)? {
            Value::Null => return Ok(Value::Null),
            Value::String(s) => {
                let s = if case_insensitive { Cow::Owned(s.to_lowercase()) } else { Cow::Borrowed(&*s) };
                like_match(&text, &compile_like(&s))
            }
            other => return Err(type_error("VARCHAR", &other)),
        },
    };
    Ok(Value::Bool(matched != negated))
}

/// Searched CASE (`operand` is `None`: first TRUE condition) or simple CASE (first value equal to
/// the operand; a NULL operand matches nothing).
fn eval_case(row: &[Value], operand: Option<&Node>, whens: &[(Node, Node)], else_: Option<&Node>) -> Result<Value, EvalError> {
    match operand {
        None => {
            for (cond, result) in whens {
                if as_bool(&cond.eval(row)?)? == Some(true) {
                    return result.eval(row);
                }
            }
        }
        Some(operand) => {
            let v = operand.eval(row)?;
            if !v.is_null() {
                for (value, result) in whens {
                    if compare(&v, &value.eval(row)?)? == Some(Ordering::Equal) {
                        return result.eval(row);
                    }
                }
            }
        }
    }
    match else_ {
        Some(e) => e.eval(row),
        None => Ok(Value::Null),
    }
}

fn eval_coalesce(row: &[Value], args: &[Node]) -> Result<Value, EvalError> {
    for a in args {
        let v = a.eval(row)?;
        if !v.is_null() {
            return Ok(v);
        }
    }
    Ok(Value::Null)
}

fn eval_nullif(row: &[Value], a: &Node, b: &Node) -> Result<Value, EvalError> {
    let v = a.eval(row)?;
    if v.is_null() {
        return Ok(v);
    }
    let w = b.eval(row)?;
    Ok(if compare(&v, &w)? == Some(Ordering::Equal) { Value::Null } else { v })
}

fn eval_round(row: &[Value], expr: &Node, digits: Option<&Node>) -> Result<Value, EvalError> {
    let v = expr.eval(row)?;
    if v.is_null() {
        return Ok(v);
    }
    let n = match digits {
        Some(d) => match d.eval(row)? {
            Value::Null => return Ok(Value::Null),
            Value::Int(n) => n,
            other => return Err(type_error("BIGINT", &other)),
        },
        None => 0,
    };
    Ok(match v {
        Value::Float(f) => Value::Float(round_f64(f, n)),
        Value::Int(i) => Value::Int(round_i64(i, n)?),
        other => return Err(type_error("a number", &other)),
    })
}

/// `a || b`; `b` is evaluated only if `a` is not NULL.
fn concat2(a: Value, r: &Node, row: &[Value]) -> Result<Value, EvalError> {
    let Some(a) = to_text(&a) else { return Ok(Value::Null) };
    let b = r.eval(row)?;
    let Some(b) = to_text(&b) else { return Ok(Value::Null) };
    let mut s = String::with_capacity(a.len() + b.len());
    s.push_str(&a);
    s.push_str(&b);
    Ok(Value::String(Arc::from(s)))
}

fn eval_concat_fn(row: &[Value], args: &[Node]) -> Result<Value, EvalError> {
    let mut s = String::new();
    for a in args {
        if let Some(t) = to_text(&a.eval(row)?) {
            s.push_str(&t);
        }
    }
    Ok(Value::String(Arc::from(s)))
}

// ---------------------------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Field;
    use proptest::prelude::*;

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("seq", DataType::Int),
            Field::new("k", DataType::String),
            Field::new("score", DataType::Float),
            Field::new("ts", DataType::Timestamp),
            Field::new("n", DataType::Int),
            Field::new("ok", DataType::Bool),
        ])
    }

    fn row() -> Vec<Value> {
        vec![
            Value::Int(7),
            Value::string("Alpha"),
            Value::Float(1234.5678),
            Value::Timestamp(1_700_000_000_000),
            Value::Null,
            Value::Bool(true),
        ]
    }

    fn eval(sql: &str) -> Value {
        let e = Expr::compile(sql, &schema()).unwrap_or_else(|e| panic!("compile `{sql}`: {e}"));
        e.eval(&row()).unwrap_or_else(|e| panic!("eval `{sql}`: {e}"))
    }

    fn eval_err(sql: &str) -> String {
        let e = Expr::compile(sql, &schema()).unwrap_or_else(|e| panic!("compile `{sql}`: {e}"));
        e.eval(&row()).expect_err(sql).0
    }

    fn compile_err(sql: &str) -> String {
        Expr::compile(sql, &schema()).expect_err(sql).to_string()
    }

    fn ty(sql: &str) -> DataType {
        Expr::compile(sql, &schema()).unwrap().data_type()
    }

    fn s(v: &str) -> Value {
        Value::string(v)
    }

    #[test]
    fn column_references() {
        assert_eq!(eval("seq"), Value::Int(7));
        assert_eq!(eval("SCORE"), Value::Float(1234.5678));
        assert_eq!(eval("\"k\""), s("Alpha"));
        assert_eq!(eval("(k)"), s("Alpha"));
        assert_eq!(Expr::compile("Ts", &schema()).unwrap().as_column(), Some(3));
        assert_eq!(Expr::compile("seq + 1", &schema()).unwrap().as_column(), None);
        assert_eq!(ty("ts"), DataType::Timestamp);
    }

    #[test]
    fn quoted_identifiers_prefer_exact_case() {
        let schema = Schema::new(vec![Field::new("a", DataType::Int), Field::new("A", DataType::String)]);
        assert_eq!(Expr::compile("\"A\"", &schema).unwrap().as_column(), Some(1));
        assert_eq!(Expr::compile("A", &schema).unwrap().as_column(), Some(0));
    }

    #[test]
    fn unknown_column_lists_available_columns() {
        let schema = Schema::new(vec![
            Field::new("seq", DataType::Int),
            Field::new("k", DataType::String),
            Field::new("score", DataType::Float),
            Field::new("ts", DataType::Timestamp),
        ]);
        let err = Expr::compile("scroe * 2", &schema).unwrap_err();
        assert_eq!(err, ExprError::UnknownColumn { name: "scroe".into(), available: "seq, k, score, ts".into(), double_quoted: false });
        assert_eq!(err.to_string(), "unknown column `scroe`; available columns: seq, k, score, ts");
        let err = Expr::compile("k = \"abc\"", &schema).unwrap_err().to_string();
        assert!(err.contains("single quotes"), "{err}");
        let err = Expr::compile("x", &Schema::default()).unwrap_err().to_string();
        assert_eq!(err, "unknown column `x`; available columns: (none)");
    }

    #[test]
    fn literals() {
        assert_eq!(eval("42"), Value::Int(42));
        assert_eq!(eval("-42"), Value::Int(-42));
        assert_eq!(eval("-9223372036854775808"), Value::Int(i64::MIN));
        assert_eq!(eval("2.5"), Value::Float(2.5));
        assert_eq!(eval("1e3"), Value::Float(1000.0));
        assert_eq!(eval("'it''s'"), s("it's"));
        assert_eq!(eval("TRUE"), Value::Bool(true));
        assert_eq!(eval("false"), Value::Bool(false));
        assert_eq!(eval("NULL"), Value::Null);
        assert_eq!(ty("NULL"), DataType::String);
        assert_eq!(ty("1.0"), DataType::Float);
        assert_eq!(eval("TIMESTAMP '2024-01-01 00:00:00'"), Value::Timestamp(1_704_067_200_000));
        assert_eq!(eval("TIMESTAMP '1970-01-01T00:00:01.5Z'"), Value::Timestamp(1500));
        let err = compile_err("9223372036854775808");
        assert!(err.contains("out of range for BIGINT"), "{err}");
        let err = compile_err("TIMESTAMP 'yesterday'");
        assert!(err.starts_with("invalid literal: cannot CAST 'yesterday' to TIMESTAMP"), "{err}");
    }

    #[test]
    fn arithmetic() {
        assert_eq!(eval("seq + 3 * 2"), Value::Int(13));
        assert_eq!(eval("(seq + 3) * 2"), Value::Int(20));
        assert_eq!(eval("seq - 10"), Value::Int(-3));
        assert_eq!(eval("seq / 2"), Value::Int(3));
        assert_eq!(eval("-seq / 2"), Value::Int(-3));
        assert_eq!(eval("seq % 4"), Value::Int(3));
        assert_eq!(eval("-seq % 4"), Value::Int(-3));
        assert_eq!(eval("seq / 2.0"), Value::Float(3.5));
        assert_eq!(eval("score / 1000.0"), Value::Float(1.2345678));
        assert_eq!(eval("-score"), Value::Float(-1234.5678));
        assert_eq!(eval("seq + 0.5"), Value::Float(7.5));
        assert_eq!(eval("5.5 % 2"), Value::Float(1.5));
        assert_eq!(ty("seq * 2"), DataType::Int);
        assert_eq!(ty("seq * 2.0"), DataType::Float);
        assert_eq!(ty("seq + NULL"), DataType::Int);
        assert_eq!(eval("seq + NULL"), Value::Null);
        assert_eq!(eval("n * 2"), Value::Null);
    }

    #[test]
    fn arithmetic_errors() {
        assert_eq!(eval_err("seq / 0"), "division by zero");
        assert_eq!(eval_err("seq % 0"), "division by zero");
        assert_eq!(eval_err("score / 0"), "division by zero");
        assert_eq!(eval_err("score / 0.0"), "division by zero");
        assert!(eval_err("9223372036854775807 + seq").contains("overflow"));
        assert!(eval_err("-9223372036854775808 - seq").contains("overflow"));
        assert!(eval_err("-9223372036854775808 / (seq - 8)").contains("overflow"));
        assert!(eval_err("-(seq - 9223372036854775807 - 8)").contains("overflow"));
        assert_eq!(eval("-9223372036854775808 % (seq - 8)"), Value::Int(0));
    }

    #[test]
    fn arithmetic_type_errors() {
        assert_eq!(compile_err("k + seq"), "type mismatch: cannot apply `+` to VARCHAR and BIGINT");
        assert_eq!(compile_err("ok * 2"), "type mismatch: cannot apply `*` to BOOLEAN and BIGINT");
        assert_eq!(compile_err("ts * 2"), "type mismatch: cannot apply `*` to TIMESTAMP and BIGINT");
        assert_eq!(compile_err("ts + 1.5"), "type mismatch: cannot apply `+` to TIMESTAMP and DOUBLE");
        assert_eq!(compile_err("-k"), "type mismatch: cannot apply unary `-` to VARCHAR");
    }

    #[test]
    fn timestamp_arithmetic() {
        assert_eq!(eval("ts + 1000"), Value::Timestamp(1_700_000_001_000));
        assert_eq!(eval("1000 + ts"), Value::Timestamp(1_700_000_001_000));
        assert_eq!(eval("ts - 1000"), Value::Timestamp(1_699_999_999_000));
        assert_eq!(eval("ts - TIMESTAMP '2023-11-14 22:13:00'"), Value::Int(20_000));
        assert_eq!(ty("ts - ts"), DataType::Int);
        assert_eq!(ty("ts + seq"), DataType::Timestamp);
        assert_eq!(eval("ts > '2023-01-01'"), Value::Bool(true));
        assert_eq!(eval("ts BETWEEN '2023-11-14' AND '2023-11-15'"), Value::Bool(true));
        assert!(compile_err("ts > 'soon'").contains("not a timestamp"));
        assert!(compile_err("ts + INTERVAL '1' MINUTE").contains("ts + 60000"));
    }

    #[test]
    fn comparisons() {
        assert_eq!(eval("seq = 7"), Value::Bool(true));
        assert_eq!(eval("seq <> 7"), Value::Bool(false));
        assert_eq!(eval("seq != 8"), Value::Bool(true));
        assert_eq!(eval("seq < 7.5"), Value::Bool(true));
        assert_eq!(eval("7.0 = seq"), Value::Bool(true));
        assert_eq!(eval("seq <= 7"), Value::Bool(true));
        assert_eq!(eval("seq > 7"), Value::Bool(false));
        assert_eq!(eval("seq >= 7"), Value::Bool(true));
        assert_eq!(eval("k = 'Alpha'"), Value::Bool(true));
        assert_eq!(eval("k < 'B'"), Value::Bool(true));
        assert_eq!(eval("ok = TRUE"), Value::Bool(true));
        assert_eq!(eval("ts = ts"), Value::Bool(true));
        assert_eq!(eval("n = 1"), Value::Null);
        assert_eq!(eval("NULL = NULL"), Value::Null);
        // Exact integer/double comparison, even beyond 2^53.
        assert_eq!(eval("9007199254740993 > 9007199254740992.0"), Value::Bool(true));
        assert_eq!(eval("9223372036854775807 < 9223372036854775808.0"), Value::Bool(true));
    }

    #[test]
    fn comparison_type_errors() {
        assert_eq!(compile_err("k = 1"), "type mismatch: cannot apply `=` to VARCHAR and BIGINT");
        assert_eq!(compile_err("ts < 5"), "type mismatch: cannot apply `<` to TIMESTAMP and BIGINT");
        assert_eq!(compile_err("ok <> 'x'"), "type mismatch: cannot apply `<>` to BOOLEAN and VARCHAR");
        assert_eq!(compile_err("seq IN (1, 'a')"), "type mismatch: cannot apply `IN` to BIGINT and VARCHAR");
    }

    #[test]
    fn logic() {
        assert_eq!(eval("ok AND seq > 5"), Value::Bool(true));
        assert_eq!(eval("NOT ok OR seq > 100"), Value::Bool(false));
        assert_eq!(eval("FALSE AND NULL"), Value::Bool(false));
        assert_eq!(eval("TRUE AND NULL"), Value::Null);
        assert_eq!(eval("NULL AND FALSE"), Value::Bool(false));
        assert_eq!(eval("TRUE OR NULL"), Value::Bool(true));
        assert_eq!(eval("NULL OR TRUE"), Value::Bool(true));
        assert_eq!(eval("FALSE OR NULL"), Value::Null);
        assert_eq!(eval("NOT NULL"), Value::Null);
        // Short-circuit: the right side is not evaluated.
        assert_eq!(eval("FALSE AND seq / 0 = 1"), Value::Bool(false));
        assert_eq!(compile_err("seq AND ok"), "type mismatch: cannot apply `AND` to BIGINT and BOOLEAN; expected BOOLEAN operands");
        assert_eq!(compile_err("NOT k"), "type mismatch: cannot apply `NOT` to VARCHAR; expected BOOLEAN");
    }

    #[test]
    fn null_tests() {
        assert_eq!(eval("n IS NULL"), Value::Bool(true));
        assert_eq!(eval("n IS NOT NULL"), Value::Bool(false));
        assert_eq!(eval("seq IS NULL"), Value::Bool(false));
        assert_eq!(eval("NULL IS NULL"), Value::Bool(true));
        assert_eq!(eval("(n > 1) IS NULL"), Value::Bool(true));
        assert_eq!(eval("(n > 1) IS NOT TRUE"), Value::Bool(true));
        assert_eq!(eval("(n > 1) IS FALSE"), Value::Bool(false));
        assert_eq!(eval("ok IS TRUE"), Value::Bool(true));
        assert_eq!(eval("n IS DISTINCT FROM NULL"), Value::Bool(false));
        assert_eq!(eval("n IS DISTINCT FROM 1"), Value::Bool(true));
        assert_eq!(eval("seq IS NOT DISTINCT FROM 7.0"), Value::Bool(true));
    }

    #[test]
    fn between_and_in() {
        assert_eq!(eval("seq BETWEEN 1 AND 7"), Value::Bool(true));
        assert_eq!(eval("seq NOT BETWEEN 1 AND 7"), Value::Bool(false));
        assert_eq!(eval("seq BETWEEN 8 AND NULL"), Value::Bool(false));
        assert_eq!(eval("seq BETWEEN 1 AND NULL"), Value::Null);
        assert_eq!(eval("seq IN (1, 7, 9)"), Value::Bool(true));
        assert_eq!(eval("seq NOT IN (1, 9)"), Value::Bool(true));
        assert_eq!(eval("seq IN (1, NULL)"), Value::Null);
        assert_eq!(eval("seq IN (7, NULL)"), Value::Bool(true));
        assert_eq!(eval("n IN (1, 2)"), Value::Null);
        assert_eq!(eval("k IN ('Alpha', 'Beta')"), Value::Bool(true));
    }

    #[test]
    fn like() {
        assert_eq!(eval("k LIKE 'Al%'"), Value::Bool(true));
        assert_eq!(eval("k LIKE 'al%'"), Value::Bool(false));
        assert_eq!(eval("k ILIKE 'al%'"), Value::Bool(true));
        assert_eq!(eval("k LIKE '_lph_'"), Value::Bool(true));
        assert_eq!(eval("k LIKE '%ph%'"), Value::Bool(true));
        assert_eq!(eval("k NOT LIKE '%x%'"), Value::Bool(true));
        assert_eq!(eval("'100%' LIKE '100\\%'"), Value::Bool(true));
        assert_eq!(eval("'1000' LIKE '100\\%'"), Value::Bool(false));
        assert_eq!(eval("k LIKE k"), Value::Bool(true));
        assert_eq!(eval("k LIKE NULL"), Value::Null);
        assert!(like_match("aXbXc", &compile_like("a%b%c")));
        assert!(like_match("abcabd", &compile_like("%abd")));
        assert!(!like_match("abc", &compile_like("a%d")));
        assert!(like_match("", &compile_like("%")));
        assert!(!like_match("", &compile_like("_")));
    }

    #[test]
    fn case_expressions() {
        assert_eq!(eval("CASE WHEN seq > 5 THEN 'big' ELSE 'small' END"), s("big"));
        assert_eq!(eval("CASE WHEN seq > 50 THEN 'big' END"), Value::Null);
        assert_eq!(eval("CASE WHEN n > 1 THEN 1 ELSE 2 END"), Value::Int(2));
        assert_eq!(eval("CASE WHEN NULL THEN 1 WHEN ok THEN 3 END"), Value::Int(3));
        assert_eq!(eval("CASE seq WHEN 1 THEN 'one' WHEN 7 THEN 'seven' ELSE 'many' END"), s("seven"));
        assert_eq!(eval("CASE n WHEN 1 THEN 'one' ELSE 'other' END"), s("other"));
        assert_eq!(eval("CASE n WHEN NULL THEN 'null' ELSE 'other' END"), s("other"));
        // Branch types unify: BIGINT and DOUBLE give DOUBLE.
        assert_eq!(ty("CASE WHEN ok THEN 1 ELSE 2.5 END"), DataType::Float);
        assert_eq!(eval("CASE WHEN ok THEN 1 ELSE 2.5 END"), Value::Float(1.0));
        assert_eq!(eval("CASE WHEN ok THEN seq ELSE score END"), Value::Float(7.0));
        assert_eq!(ty("CASE WHEN ok THEN NULL ELSE seq END"), DataType::Int);
        assert_eq!(
            compile_err("CASE WHEN ok THEN 1 ELSE 'x' END"),
            "type mismatch: CASE branches have incompatible types BIGINT and VARCHAR (at `ELSE 'x'`)"
        );
        assert_eq!(compile_err("CASE WHEN seq THEN 1 END"), "type mismatch: CASE WHEN condition `seq` must be BOOLEAN, found BIGINT");
        assert!(compile_err("CASE k WHEN 1 THEN 1 END").contains("VARCHAR and BIGINT"));
    }

    #[test]
    fn casts() {
        assert_eq!(eval("CAST(seq AS DOUBLE)"), Value::Float(7.0));
        assert_eq!(eval("CAST(score AS BIGINT)"), Value::Int(1235));
        assert_eq!(eval("CAST(-2.5 AS BIGINT)"), Value::Int(-3));
        assert_eq!(eval("CAST(seq AS VARCHAR)"), s("7"));
        assert_eq!(eval("CAST(seq AS TEXT)"), s("7"));
        assert_eq!(eval("CAST(seq AS VARCHAR(10))"), s("7"));
        assert_eq!(eval("CAST(score AS VARCHAR)"), s("1234.5678"));
        assert_eq!(eval("CAST(ok AS VARCHAR)"), s("true"));
        assert_eq!(eval("CAST(' 42 ' AS BIGINT)"), Value::Int(42));
        assert_eq!(eval("CAST('2.5' AS DOUBLE PRECISION)"), Value::Float(2.5));
        assert_eq!(eval("CAST('yes' AS BOOLEAN)"), Value::Bool(true));
        assert_eq!(eval("CAST(0 AS BOOLEAN)"), Value::Bool(false));
        assert_eq!(eval("CAST(ok AS BIGINT)"), Value::Int(1));
        assert_eq!(eval("CAST(ts AS BIGINT)"), Value::Int(1_700_000_000_000));
        assert_eq!(eval("CAST(0 AS TIMESTAMP)"), Value::Timestamp(0));
        assert_eq!(eval("CAST(ts AS VARCHAR)"), s("2023-11-14 22:13:20"));
        assert_eq!(eval("CAST('2024-02-29 12:00:00.250' AS TIMESTAMP)"), Value::Timestamp(1_709_208_000_250));
        assert_eq!(eval("CAST(NULL AS BIGINT)"), Value::Null);
        assert_eq!(eval("CAST(n AS VARCHAR)"), Value::Null);
        assert_eq!(ty("CAST(NULL AS BIGINT)"), DataType::Int);
        assert_eq!(eval("seq::DOUBLE"), Value::Float(7.0));
        assert_eq!(eval("TRY_CAST('abc' AS BIGINT)"), Value::Null);
        assert_eq!(eval_err("CAST('abc' AS BIGINT)"), "cannot CAST 'abc' to BIGINT");
        assert!(eval_err("CAST(1e300 AS BIGINT)").contains("out of range"));
        assert!(eval_err("CAST('2024-02-30' AS TIMESTAMP)").contains("cannot CAST '2024-02-30' to TIMESTAMP"));
        assert_eq!(compile_err("CAST(ok AS TIMESTAMP)"), "type mismatch: cannot CAST BOOLEAN to TIMESTAMP");
        assert!(compile_err("CAST(seq AS BLOB)").contains("supported types: BOOLEAN, BIGINT"));
        // A no-op cast of a column is still that column.
        assert_eq!(Expr::compile("CAST(seq AS BIGINT)", &schema()).unwrap().as_column(), Some(0));
    }

    #[test]
    fn round() {
        assert_eq!(eval("ROUND(score / 1000.0, 2)"), Value::Float(1.23));
        assert_eq!(eval("ROUND(score)"), Value::Float(1235.0));
        assert_eq!(eval("ROUND(score, -2)"), Value::Float(1200.0));
        assert_eq!(eval("ROUND(2.5)"), Value::Float(3.0));
        assert_eq!(eval("ROUND(-2.5)"), Value::Float(-3.0));
        assert_eq!(eval("ROUND(0.125, 2)"), Value::Float(0.13));
        assert_eq!(eval("ROUND(1.005, 2)"), Value::Float(1.01));
        assert_eq!(eval("ROUND(-1.005, 2)"), Value::Float(-1.01));
        assert_eq!(eval("ROUND(2.675, 2)"), Value::Float(2.68));
        // A tie in decimal that binary arithmetic puts just below: 10.885 / 311 = 0.035 exactly.
        assert_eq!(eval("ROUND(10885 / 1000.0 / 311, 2)"), Value::Float(0.04));
        assert_eq!(eval("ROUND(-0.4)"), Value::Float(0.0));
        assert_eq!(eval("ROUND(123456789012.5)"), Value::Float(123456789013.0));
        assert_eq!(eval("ROUND(1.5e-10, 10)"), Value::Float(2e-10));
        assert_eq!(eval("ROUND(1.25, 30)"), Value::Float(1.25));
        assert_eq!(eval("ROUND(seq)"), Value::Int(7));
        assert_eq!(eval("ROUND(seq, 2)"), Value::Int(7));
        assert_eq!(eval("ROUND(1250, -2)"), Value::Int(1300));
        assert_eq!(eval("ROUND(-1250, -2)"), Value::Int(-1300));
        assert_eq!(eval("ROUND(1249, -2)"), Value::Int(1200));
        assert_eq!(eval("ROUND(seq, -25)"), Value::Int(0));
        assert!(eval_err("ROUND(9223372036854775807, -1)").contains("overflow"));
        assert_eq!(eval("ROUND(n)"), Value::Null);
        assert_eq!(eval("ROUND(score, n)"), Value::Null);
        assert_eq!(ty("ROUND(seq)"), DataType::Int);
        assert_eq!(ty("ROUND(score, 1)"), DataType::Float);
        assert!(compile_err("ROUND(k)").contains("ROUND expects a numeric value"));
        assert!(compile_err("ROUND(score, 1.5)").contains("BIGINT number of decimals"));
        assert!(compile_err("ROUND(score, 1, 2)").contains("ROUND takes 1 or 2 arguments"));
    }

    #[test]
    fn coalesce_and_nullif() {
        assert_eq!(eval("COALESCE(n, seq)"), Value::Int(7));
        assert_eq!(eval("COALESCE(n, NULL)"), Value::Null);
        assert_eq!(eval("COALESCE(n, 1.5)"), Value::Float(1.5));
        assert_eq!(eval("COALESCE(seq, 1.5)"), Value::Float(7.0));
        assert_eq!(ty("COALESCE(n, 1.5)"), DataType::Float);
        assert_eq!(eval("COALESCE(seq, 1 / 0)"), Value::Int(7));
        assert_eq!(
            compile_err("COALESCE(seq, k)"),
            "type mismatch: COALESCE arguments have incompatible types BIGINT and VARCHAR (argument 2 `k`)"
        );
        assert_eq!(eval("NULLIF(seq, 7)"), Value::Null);
        assert_eq!(eval("NULLIF(seq, 8)"), Value::Int(7));
    }

    #[test]
    fn strings() {
        assert_eq!(eval("k || '-' || seq"), s("Alpha-7"));
        assert_eq!(eval("k || score"), s("Alpha1234.5678"));
        assert_eq!(eval("k || n"), Value::Null);
        assert_eq!(eval("CONCAT(k, n, '!', ok)"), s("Alpha!true"));
        assert_eq!(eval("LOWER(k)"), s("alpha"));
        assert_eq!(eval("UPPER(k)"), s("ALPHA"));
        assert_eq!(eval("LENGTH('héllo')"), Value::Int(5));
        assert_eq!(eval("UPPER(NULL)"), Value::Null);
        assert_eq!(
            compile_err("seq || seq"),
            "type mismatch: cannot apply `||` to BIGINT and BIGINT; at least one operand must be VARCHAR"
        );
        assert_eq!(compile_err("LOWER(seq)"), "type mismatch: LOWER expects a VARCHAR argument, found BIGINT");
    }

    #[test]
    fn numeric_functions() {
        assert_eq!(eval("ABS(-seq)"), Value::Int(7));
        assert_eq!(eval("ABS(-2.5)"), Value::Float(2.5));
        assert!(eval_err("ABS(-9223372036854775808)").contains("overflow"));
        assert_eq!(eval("FLOOR(score)"), Value::Float(1234.0));
        assert_eq!(eval("CEIL(score)"), Value::Float(1235.0));
        assert_eq!(eval("FLOOR(-0.5)"), Value::Float(-1.0));
        assert_eq!(eval("FLOOR(seq)"), Value::Int(7));
        assert_eq!(eval("abs(n)"), Value::Null);
    }

    #[test]
    fn unsupported_constructs() {
        let err = compile_err("FOO(nope)");
        assert!(err.starts_with("unsupported: function `FOO`; supported functions: ABS"), "{err}");
        let err = compile_err("SUM(score)");
        assert!(err.contains("aggregate function `SUM(score)`"), "{err}");
        assert!(compile_err("t.seq").contains("refer to the column as `seq`"));
        assert!(compile_err("seq IN (SELECT 1)").contains("unsupported"));
    }

    #[test]
    fn parse_errors() {
        let err = compile_err("seq +");
        assert!(err.starts_with("cannot parse SQL expression `seq +`"), "{err}");
        let err = compile_err("seq + 1 extra");
        assert!(err.contains("unexpected `extra`"), "{err}");
        assert_eq!(compile_err("  "), "empty SQL expression");
        assert!(matches!(parse_expr("(1"), Err(ExprError::Parse(_))));
    }

    #[test]
    fn deep_nesting_is_rejected_not_overflowed() {
        let sql = vec!["seq"; 2000].join(" + ");
        let err = compile_err(&sql);
        assert!(err.contains("nested"), "{err}");
        // The deepest accepted expression compiles and evaluates on a test thread's 2 MiB stack.
        let sql = vec!["seq"; MAX_DEPTH].join(" + ");
        assert_eq!(eval(&sql), Value::Int(7 * MAX_DEPTH as i64));
        let sql = format!("{}seq{}", "(".repeat(MAX_DEPTH - 1), ")".repeat(MAX_DEPTH - 1));
        assert!(compile_err(&sql).contains("nested"));
    }

    #[test]
    fn select_list() {
        let items = parse_select_list("k, score * 2 AS doubled, ts").unwrap();
        let names: Vec<&str> = items.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["k", "doubled", "ts"]);
        let e = Expr::from_ast(&items[1].1, &schema()).unwrap();
        assert_eq!(e.eval(&row()).unwrap(), Value::Float(2469.1356));
        assert_eq!(Expr::from_ast(&items[0].1, &schema()).unwrap().as_column(), Some(1));

        let aggs = parse_select_list("SUM(score) AS total, COUNT(*) AS n").unwrap();
        assert_eq!(aggs[0].0, "total");
        assert_eq!(aggs[1].0, "n");
        assert_eq!(aggs[1].1.to_string(), "COUNT(*)");

        let err = parse_select_list("k, score * 2").unwrap_err();
        assert_eq!(err, ExprError::MissingName("score * 2".into()));
        assert_eq!(err.to_string(), "expression `score * 2` needs a name: write `score * 2 AS name`");
        assert!(parse_select_list("k, K").unwrap_err().to_string().contains("duplicate output name `K`"));
        assert!(parse_select_list("*").unwrap_err().to_string().contains("list the columns"));
        assert!(matches!(parse_select_list("k FROM t"), Err(ExprError::Parse(_))));
        assert!(matches!(parse_select_list(""), Err(ExprError::Parse(_))));
    }

    #[test]
    fn timestamp_parsing_and_formatting() {
        assert_eq!(parse_timestamp("1970-01-01"), Some(0));
        assert_eq!(parse_timestamp("1970-01-01 00:00"), Some(0));
        assert_eq!(parse_timestamp("1969-12-31 23:59:59.999"), Some(-1));
        assert_eq!(parse_timestamp("2024-01-01T01:00:00+01:00"), Some(1_704_067_200_000));
        assert_eq!(parse_timestamp("2024-01-01 00:00:00 UTC"), Some(1_704_067_200_000));
        assert_eq!(parse_timestamp("2024-01-01 00:00:00.123456"), Some(1_704_067_200_123));
        assert_eq!(parse_timestamp("2023-02-29"), None);
        assert_eq!(parse_timestamp("2024-13-01"), None);
        assert_eq!(parse_timestamp("2024-01-01 24:00:00"), None);
        assert_eq!(parse_timestamp("2024-01-01x"), None);
        assert_eq!(format_timestamp(-1), "1969-12-31 23:59:59.999");
        assert_eq!(format_timestamp(1_704_067_200_000), "2024-01-01 00:00:00");
    }

    #[test]
    fn eval_on_short_row_is_an_error_not_a_panic() {
        let e = Expr::compile("score + 1", &schema()).unwrap();
        assert!(e.eval(&[Value::Int(1)]).unwrap_err().0.contains("row has 1 values"));
    }

    // ---- property tests: SQL NULL semantics against reference implementations ----

    fn ab_schema() -> Schema {
        Schema::new(vec![
            Field::new("a", DataType::Int),
            Field::new("b", DataType::Int),
            Field::new("p", DataType::Bool),
            Field::new("q", DataType::Bool),
            Field::new("x", DataType::Float),
        ])
    }

    fn int(v: Option<i64>) -> Value {
        v.map_or(Value::Null, Value::Int)
    }

    fn boolean(v: Option<bool>) -> Value {
        v.map_or(Value::Null, Value::Bool)
    }

    fn run(sql: &str, row: &[Value]) -> Result<Value, EvalError> {
        Expr::compile(sql, &ab_schema()).unwrap_or_else(|e| panic!("compile `{sql}`: {e}")).eval(row)
    }

    fn ab_row(a: Option<i64>, b: Option<i64>) -> Vec<Value> {
        vec![int(a), int(b), Value::Null, Value::Null, Value::Null]
    }

    fn pq_row(p: Option<bool>, q: Option<bool>) -> Vec<Value> {
        vec![Value::Null, Value::Null, boolean(p), boolean(q), Value::Null]
    }

    fn and3(p: Option<bool>, q: Option<bool>) -> Option<bool> {
        match (p, q) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        }
    }

    fn or3(p: Option<bool>, q: Option<bool>) -> Option<bool> {
        match (p, q) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        }
    }

    fn small_or_any() -> impl Strategy<Value = Option<i64>> {
        prop::option::of(prop_oneof![-1000i64..1000, any::<i64>(), Just(0i64), Just(i64::MIN), Just(i64::MAX)])
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn prop_int_arithmetic_matches_checked_ops(a in small_or_any(), b in small_or_any()) {
            type Op = fn(i64, i64) -> Option<i64>;
            let ops: [(&str, Op); 5] = [
                ("a + b", i64::checked_add),
                ("a - b", i64::checked_sub),
                ("a * b", i64::checked_mul),
                ("a / b", i64::checked_div),
                ("a % b", |x, y| if y == 0 { None } else { Some(x.wrapping_rem(y)) }),
            ];
            for (sql, op) in ops {
                let got = run(sql, &ab_row(a, b));
                match (a, b) {
                    (Some(x), Some(y)) => match op(x, y) {
                        Some(v) => prop_assert_eq!(got, Ok(Value::Int(v)), "{}", sql),
                        None => {
                            let err = got.expect_err(sql).0;
                            if y == 0 && (sql.contains('/') || sql.contains('%')) {
                                prop_assert_eq!(err, "division by zero");
                            } else {
                                prop_assert!(err.contains("overflow"), "{}: {}", sql, err);
                            }
                        }
                    },
                    _ => prop_assert_eq!(got, Ok(Value::Null), "{}", sql),
                }
            }
        }

        #[test]
        fn prop_three_valued_logic(p in prop::option::of(any::<bool>()), q in prop::option::of(any::<bool>())) {
            let row = pq_row(p, q);
            prop_assert_eq!(run("p AND q", &row), Ok(boolean(and3(p, q))));
            prop_assert_eq!(run("p OR q", &row), Ok(boolean(or3(p, q))));
            prop_assert_eq!(run("NOT p", &row), Ok(boolean(p.map(|v| !v))));
            prop_assert_eq!(run("p IS NULL", &row), Ok(Value::Bool(p.is_none())));
            prop_assert_eq!(run("p IS TRUE", &row), Ok(Value::Bool(p == Some(true))));
            prop_assert_eq!(run("p IS NOT FALSE", &row), Ok(Value::Bool(p != Some(false))));
            // De Morgan holds in three-valued logic too.
            prop_assert_eq!(run("NOT (p AND q)", &row), run("NOT p OR NOT q", &row));
            let case = run("CASE WHEN p THEN 1 WHEN q THEN 2 ELSE 3 END", &row).unwrap();
            let want = if p == Some(true) { 1 } else if q == Some(true) { 2 } else { 3 };
            prop_assert_eq!(case, Value::Int(want));
        }

        #[test]
        fn prop_is_null_and_coalesce(a in small_or_any(), b in small_or_any()) {
            let row = ab_row(a, b);
            prop_assert_eq!(run("a IS NULL", &row), Ok(Value::Bool(a.is_none())));
            prop_assert_eq!(run("a IS NOT NULL", &row), Ok(Value::Bool(a.is_some())));
            prop_assert_eq!(run("COALESCE(a, b)", &row), Ok(int(a.or(b))));
            prop_assert_eq!(run("COALESCE(a, b, 0)", &row), Ok(Value::Int(a.or(b).unwrap_or(0))));
            prop_assert_eq!(run("CAST(a AS VARCHAR) IS NULL", &row), Ok(Value::Bool(a.is_none())));
            prop_assert_eq!(run("CAST(CAST(a AS VARCHAR) AS BIGINT)", &row), Ok(int(a)));
            prop_assert_eq!(run("a IS DISTINCT FROM b", &row), Ok(Value::Bool(a != b)));
        }

        #[test]
        fn prop_comparisons_match_rust_ordering(a in small_or_any(), b in small_or_any()) {
            let row = ab_row(a, b);
            type Cmp = fn(&i64, &i64) -> bool;
            let ops: [(&str, Cmp); 7] = [
                ("a = b", i64::eq), ("a <> b", i64::ne), ("a != b", i64::ne), ("a < b", i64::lt),
                ("a <= b", i64::le), ("a > b", i64::gt), ("a >= b", i64::ge),
            ];
            for (sql, op) in ops {
                let want = match (a, b) {
                    (Some(x), Some(y)) => Value::Bool(op(&x, &y)),
                    _ => Value::Null,
                };
                prop_assert_eq!(run(sql, &row), Ok(want), "{}", sql);
            }
            if b.is_none_or(|y| y.checked_sub(10).is_some() && y.checked_add(10).is_some()) {
                let between = match (a, b) {
                    (Some(x), Some(y)) => Value::Bool(y - 10 <= x && x <= y + 10),
                    _ => Value::Null,
                };
                prop_assert_eq!(run("a BETWEEN b - 10 AND b + 10", &row), Ok(between));
            }
            let in_list = match (a, b) {
                (None, _) => Value::Null,
                (Some(x), _) if x == 1 || Some(x) == b => Value::Bool(true),
                (Some(_), None) => Value::Null,
                (Some(_), Some(_)) => Value::Bool(false),
            };
            prop_assert_eq!(run("a IN (1, b)", &row), Ok(in_list));
        }

        #[test]
        fn prop_int_float_comparison_is_numeric(i in -(1i64 << 53)..(1i64 << 53), f in any::<f64>()) {
            let row = vec![Value::Int(i), Value::Null, Value::Null, Value::Null, Value::Float(f)];
            let want = if f.is_nan() { Ordering::Less } else { (i as f64).partial_cmp(&f).unwrap() };
            prop_assert_eq!(run("a < x", &row), Ok(Value::Bool(want == Ordering::Less)));
            prop_assert_eq!(run("a = x", &row), Ok(Value::Bool(want == Ordering::Equal)));
            prop_assert_eq!(run("x > a", &row), Ok(Value::Bool(want == Ordering::Less)));
        }

        #[test]
        fn prop_round_is_close(x in -1e9f64..1e9, n in 0i64..6) {
            let row = vec![Value::Int(n), Value::Null, Value::Null, Value::Null, Value::Float(x)];
            let Value::Float(r) = run("ROUND(x, a)", &row).unwrap() else { panic!("not a float") };
            let half = 0.5 / 10f64.powi(n as i32);
            prop_assert!((r - x).abs() <= half * (1.0 + 1e-9) + 1e-6, "ROUND({}, {}) = {}", x, n, r);
            // Idempotent.
            prop_assert_eq!(round_f64(r, n), r);
        }

        #[test]
        fn prop_timestamp_format_round_trips(ms in -62_000_000_000_000i64..250_000_000_000_000) {
            prop_assert_eq!(parse_timestamp(&format_timestamp(ms)), Some(ms));
        }
    }
}
