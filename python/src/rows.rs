//! Rows of `Client.query` as Python dicts: each column by its PostgreSQL type (numbers, text,
//! bytea, json, arrays, timestamps); other types are refused with a hint to cast them.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use pyo3::IntoPyObjectExt;
use tokio_postgres::types::Type;
use tokio_postgres::Row;

pub fn to_dict<'py>(py: Python<'py>, row: &Row) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (i, column) in row.columns().iter().enumerate() {
        dict.set_item(
            column.name(),
            value(py, row, i, column.type_(), column.name())?,
        )?;
    }
    Ok(dict)
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> PyResult<T> {
    row.try_get(i)
        .map_err(|e| PyTypeError::new_err(format!("column {i}: {e}")))
}

fn value(py: Python<'_>, row: &Row, i: usize, ty: &Type, name: &str) -> PyResult<Py<PyAny>> {
    macro_rules! plain {
        ($t:ty) => {
            get::<Option<$t>>(row, i)?.into_py_any(py)
        };
    }
    match *ty {
        Type::BOOL => plain!(bool),
        Type::INT2 => plain!(i16),
        Type::INT4 => plain!(i32),
        Type::INT8 => plain!(i64),
        Type::OID => plain!(u32),
        Type::FLOAT4 => plain!(f32),
        Type::FLOAT8 => plain!(f64),
        Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR | Type::UNKNOWN => plain!(String),
        Type::INT2_ARRAY => plain!(Vec<Option<i16>>),
        Type::INT4_ARRAY => plain!(Vec<Option<i32>>),
        Type::INT8_ARRAY => plain!(Vec<Option<i64>>),
        Type::FLOAT4_ARRAY => plain!(Vec<Option<f32>>),
        Type::FLOAT8_ARRAY => plain!(Vec<Option<f64>>),
        Type::TEXT_ARRAY | Type::VARCHAR_ARRAY | Type::NAME_ARRAY => {
            plain!(Vec<Option<String>>)
        }
        Type::BOOL_ARRAY => plain!(Vec<Option<bool>>),
        Type::BYTEA => match get::<Option<&[u8]>>(row, i)? {
            Some(bytes) => PyBytes::new(py, bytes).into_py_any(py),
            None => Ok(py.None()),
        },
        Type::JSON | Type::JSONB => match get::<Option<serde_json::Value>>(row, i)? {
            Some(json) => py
                .import("json")?
                .call_method1("loads", (json.to_string(),))?
                .into_py_any(py),
            None => Ok(py.None()),
        },
        Type::NUMERIC => match get::<Option<NumericText>>(row, i)? {
            // Integers (sum() of bigint, count-like values) as int, others as Decimal.
            Some(NumericText(text)) if !text.contains(['.', 'N']) => py
                .import("builtins")?
                .getattr("int")?
                .call1((text,))?
                .into_py_any(py),
            Some(NumericText(text)) => py
                .import("decimal")?
                .getattr("Decimal")?
                .call1((text,))?
                .into_py_any(py),
            None => Ok(py.None()),
        },
        Type::TIMESTAMPTZ | Type::TIMESTAMP => {
            match get::<Option<std::time::SystemTime>>(row, i)? {
                Some(at) => {
                    let secs = match at.duration_since(std::time::UNIX_EPOCH) {
                        Ok(d) => d.as_secs_f64(),
                        Err(e) => -e.duration().as_secs_f64(),
                    };
                    let datetime = py.import("datetime")?;
                    let utc = datetime.getattr("timezone")?.getattr("utc")?;
                    datetime
                        .getattr("datetime")?
                        .call_method1("fromtimestamp", (secs, utc))?
                        .into_py_any(py)
                }
                None => Ok(py.None()),
            }
        }
        _ => Err(PyTypeError::new_err(format!(
            "column \"{name}\" has type {ty}, which query() does not convert: cast it in the \
             query (::text, ::float8, ...)"
        ))),
    }
}

/// A `numeric` in decimal notation, decoded from its binary form: digit count, weight (in
/// base-10000 digits), sign, display scale, then the base-10000 digits.
struct NumericText(String);

impl<'a> tokio_postgres::types::FromSql<'a> for NumericText {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let word = |k: usize| -> Result<u16, Box<dyn std::error::Error + Sync + Send>> {
            raw.get(2 * k..2 * k + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or_else(|| "a short numeric".into())
        };
        let (ndigits, weight, sign, dscale) = (
            word(0)? as usize,
            word(1)? as i16,
            word(2)?,
            word(3)? as usize,
        );
        if sign == 0xC000 {
            return Ok(NumericText("NaN".into()));
        }
        let digits: Vec<u16> = (0..ndigits)
            .map(|k| word(4 + k))
            .collect::<Result<_, _>>()?;
        // Integer part: base-10000 digits 0..=weight; fraction: the rest, to dscale places.
        let mut int = String::new();
        for k in 0..=weight.max(-1) as i32 {
            let d = digits.get(k as usize).copied().unwrap_or(0);
            if int.is_empty() {
                if d != 0 {
                    int = d.to_string();
                }
            } else {
                int.push_str(&format!("{d:04}"));
            }
        }
        if int.is_empty() {
            int.push('0');
        }
        let mut frac = String::new();
        let first_frac = (weight as i32 + 1).max(0);
        let leading_zero_groups = (-(weight as i32) - 1).max(0);
        for _ in 0..leading_zero_groups {
            frac.push_str("0000");
        }
        for k in first_frac..ndigits as i32 {
            frac.push_str(&format!("{:04}", digits[k as usize]));
        }
        while frac.len() < dscale {
            frac.push('0');
        }
        frac.truncate(dscale);
        let sign = if sign == 0x4000 { "-" } else { "" };
        Ok(NumericText(if dscale > 0 {
            format!("{sign}{int}.{frac}")
        } else {
            format!("{sign}{int}")
        }))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}
