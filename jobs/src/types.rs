//! Values, types and schemas shared by the planner (type checking) and the worker (execution).

use std::fmt;
use std::sync::Arc;

/// The SQL types Eddy computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `BOOLEAN`
    Bool,
    /// `BIGINT` (64-bit signed)
    Int,
    /// `DOUBLE`
    Float,
    /// `VARCHAR` / `TEXT`
    String,
    /// `TIMESTAMP`, stored as milliseconds since the Unix epoch (UTC).
    Timestamp,
}

impl DataType {
    /// Whether arithmetic applies to this type.
    pub fn is_numeric(self) -> bool {
        matches!(self, DataType::Int | DataType::Float)
    }

    /// Parses a type name as written in specs and in `CAST(x AS …)`.
    pub fn parse(name: &str) -> Option<DataType> {
        Some(match name.to_ascii_lowercase().as_str() {
            "bool" | "boolean" => DataType::Bool,
            "int" | "integer" | "bigint" | "smallint" | "int8" | "int4" | "long" => DataType::Int,
            "float" | "double" | "real" | "double precision" | "float8" | "decimal" | "numeric" => DataType::Float,
            "string" | "text" | "varchar" | "char" => DataType::String,
            "timestamp" | "timestamptz" => DataType::Timestamp,
            _ => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataType::Bool => "BOOLEAN",
            DataType::Int => "BIGINT",
            DataType::Float => "DOUBLE",
            DataType::String => "VARCHAR",
            DataType::Timestamp => "TIMESTAMP",
        })
    }
}

/// One value of a row. `Null` is SQL's NULL and belongs to every type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit integer.
    Int(i64),
    /// A double.
    Float(f64),
    /// A string; shared, since rows are cloned into keys and outputs.
    String(Arc<str>),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
}

impl Value {
    /// Whether this is SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value's type, or `None` for NULL.
    pub fn data_type(&self) -> Option<DataType> {
        Some(match self {
            Value::Null => return None,
            Value::Bool(_) => DataType::Bool,
            Value::Int(_) => DataType::Int,
            Value::Float(_) => DataType::Float,
            Value::String(_) => DataType::String,
            Value::Timestamp(_) => DataType::Timestamp,
        })
    }

    /// A string value.
    pub fn string(s: &str) -> Value {
        Value::String(Arc::from(s))
    }
}

/// A named, typed column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Column name, as referenced by expressions.
    pub name: String,
    /// Column type.
    pub data_type: DataType,
}

impl Field {
    /// A new field.
    pub fn new(name: impl Into<String>, data_type: DataType) -> Field {
        Field { name: name.into(), data_type }
    }
}

/// The columns of a stream, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schema {
    /// Columns in row order.
    pub fields: Vec<Field>,
}

impl Schema {
    /// A schema from its fields.
    pub fn new(fields: Vec<Field>) -> Schema {
        Schema { fields }
    }

    /// Position of a column by name (case-insensitive, as SQL identifiers are).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name.eq_ignore_ascii_case(name))
    }

    /// Column names joined for error messages.
    pub fn names(&self) -> String {
        self.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// A row: one value per schema column.
pub type Row = Vec<Value>;
