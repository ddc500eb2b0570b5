//! A row condition written by a user for PostgreSQL (`eddy backfill --where …`), checked to be
//! one expression over the row and nothing more, and given back as the text Eddy sends.
//!
//! The text goes into a query the worker runs with its replication role, so it must not reach
//! beyond the row: no subquery (another table's rows into the job's sinks, or a secret into an
//! error message), no set operation, no function but a few pure ones. Parsing it and writing it
//! back from the parse also means no closing parenthesis can end the condition early.

use sqlparser::ast::{self, BinaryOperator, FunctionArg, FunctionArgExpr, FunctionArguments, InTarget, UnaryOperator};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

/// Functions a condition may call: pure ones (and the clock).
const FUNCTIONS: &[&str] =
    &["abs", "coalesce", "date_trunc", "length", "lower", "upper", "now", "nullif", "greatest", "least", "current_timestamp"];

/// Types a condition may cast to or write a literal of: PostgreSQL's own (a type of the user's
/// may have input or cast functions that run anything).
const TYPES: &[&str] = &[
    "smallint",
    "int",
    "integer",
    "bigint",
    "int2",
    "int4",
    "int8",
    "real",
    "float",
    "float4",
    "float8",
    "double precision",
    "numeric",
    "decimal",
    "text",
    "varchar",
    "character varying",
    "char",
    "character",
    "boolean",
    "bool",
    "date",
    "time",
    "timestamp",
    "timestamptz",
    "timestamp with time zone",
    "timestamp without time zone",
    "interval",
    "uuid",
];

/// What a condition may hold, for error messages.
const ALLOWED: &str = "columns (unqualified), constants, comparisons, AND/OR/NOT, BETWEEN, IN (a list), LIKE, \
                       IS [NOT] NULL, casts to built-in types, arithmetic, ||, intervals and the functions";

/// The condition as Eddy sends it to PostgreSQL, or why it is refused (saying what is allowed).
pub fn postgres_condition(sql: &str) -> Result<String, String> {
    if sql.trim().is_empty() {
        return Err("the condition is empty; give one such as `id BETWEEN 1 AND 100` (or `true` for every row)".into());
    }
    let dialect = PostgreSqlDialect {};
    let refuse = |e: String| format!("cannot parse the condition `{sql}`: {e}");
    let mut parser = Parser::new(&dialect).try_with_sql(sql).map_err(|e| refuse(e.to_string()))?;
    let expr = parser.parse_expr().map_err(|e| refuse(e.to_string()))?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return Err(refuse(format!("`{}` after the end of the condition; give one expression", next.token)));
    }
    check(&expr)?;
    Ok(expr.to_string())
}

fn check(e: &ast::Expr) -> Result<(), String> {
    use ast::Expr::*;
    let refused = || Err(format!("`{e}` is not allowed in a condition: it may hold {ALLOWED} {}", FUNCTIONS.join(", ")));
    let built_in = |t: &ast::DataType| {
        let name = t.to_string().to_ascii_lowercase();
        TYPES.contains(&name.split('(').next().unwrap_or_default().trim())
    };
    match e {
        Identifier(_) | Value(_) => Ok(()),
        TypedString(t) if built_in(&t.data_type) => Ok(()),
        Cast { expr, data_type, .. } if built_in(data_type) => check(expr),
        BinaryOp { left, op, right } if operator(op) => check(left).and(check(right)),
        UnaryOp { op: UnaryOperator::Not | UnaryOperator::Minus | UnaryOperator::Plus, expr } => check(expr),
        IsFalse(x) | IsNotFalse(x) | IsTrue(x) | IsNotTrue(x) | IsNull(x) | IsNotNull(x) | IsUnknown(x) | IsNotUnknown(x) | Nested(x) => {
            check(x)
        }
        IsDistinctFrom(a, b) | IsNotDistinctFrom(a, b) => check(a).and(check(b)),
        Between { expr, low, high, .. } => check(expr).and(check(low)).and(check(high)),
        In { expr, target: InTarget::List(list), .. } => check(expr).and(list.iter().try_for_each(check)),
        Like { expr, pattern, escape_char, .. } | ILike { expr, pattern, escape_char, .. } => {
            check(expr).and(check(pattern)).and(escape_char.as_deref().map_or(Ok(()), check))
        }
        Interval(i) => check(&i.value),
        Function(f) => {
            let name = f.name.to_string().to_ascii_lowercase();
            let plain = !f.uses_odbc_syntax
                && matches!(f.parameters, FunctionArguments::None)
                && f.within_group.is_empty()
                && f.filter.is_none()
                && f.null_treatment.is_none()
                && f.over.is_none();
            if !FUNCTIONS.contains(&name.as_str()) || !plain {
                return refused();
            }
            match &f.args {
                FunctionArguments::None => Ok(()),
                FunctionArguments::List(l) if l.duplicate_treatment.is_none() && l.clauses.is_empty() => {
                    l.args.iter().try_for_each(|a| match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => check(x),
                        _ => Err(format!("`{e}`: only plain arguments are allowed")),
                    })
                }
                _ => Err(format!("`{e}`: only plain arguments are allowed")),
            }
        }
        _ => refused(),
    }
}

/// PostgreSQL's own operators of comparison, logic and arithmetic (one of the user's may run
/// anything).
fn operator(op: &BinaryOperator) -> bool {
    use BinaryOperator::*;
    matches!(op, Plus | Minus | Multiply | Divide | Modulo | StringConcat | Gt | Lt | GtEq | LtEq | Eq | NotEq | And | Or)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_over_the_row_pass_and_nothing_else_does() {
        for ok in [
            "id BETWEEN 100 AND 200",
            "content_id = 'a7e1c6c8-0f5e-4d2b-9b1a-5c2e8f3d4a10'::uuid AND NOT flagged",
            "event_ts > now() - interval '1 hour' OR device IS NULL",
            "lower(device) LIKE 'web%' AND id IN (1, 2, 3)",
            "true",
        ] {
            assert!(postgres_condition(ok).is_ok(), "{ok}: {:?}", postgres_condition(ok));
        }
        assert_eq!(postgres_condition(" id  between 1 and 2 ").unwrap(), "id BETWEEN 1 AND 2");
        for (bad, says) in [
            ("", "empty"),
            ("false) UNION ALL (SELECT * FROM secrets", "after the end"),
            ("id IN (SELECT id FROM other)", "not allowed"),
            ("EXISTS (SELECT 1 FROM pg_authid)", "not allowed"),
            ("CAST((SELECT passwd FROM pg_shadow LIMIT 1) AS int) = 1", "not allowed"),
            ("pg_terminate_backend(1)", "not allowed"),
            ("pg_sleep(100) IS NULL", "not allowed"),
            ("id = 1; DROP TABLE t", "after the end"),
            ("events.secret_fn = 1", "not allowed"),
            ("id OPERATOR(public.===) 1", "not"),
            ("'x'::my_type = 'x'", "not allowed"),
            ("my_type 'x' IS NULL", "not"),
        ] {
            let err = postgres_condition(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
