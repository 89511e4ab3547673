//! serde values → Python objects, so results reach scripts with the same content and field
//! names as the CLI's `--json` output (which serializes the same structs).
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::Value;

/// Converts the result of `serde_json::to_value(result)` to plain Python objects.
pub(crate) fn to_py(py: Python<'_>, json: serde_json::Result<Value>) -> PyResult<PyObject> {
    let json = json.map_err(|e| {
        super::errors::raise(py, "InternalError", format!("cannot convert a result: {e}"))
    })?;
    value_to_py(py, &json)
}

fn value_to_py(py: Python<'_>, value: &Value) -> PyResult<PyObject> {
    Ok(match value {
        Value::Null => py.None(),
        Value::Bool(b) => b.into_py(py),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_py(py),
            (None, Some(i)) => i.into_py(py),
            _ => n.as_f64().unwrap_or(f64::NAN).into_py(py),
        },
        Value::String(s) => s.into_py(py),
        Value::Array(items) => {
            let list = PyList::empty_bound(py);
            for item in items {
                list.append(value_to_py(py, item)?)?;
            }
            list.into_py(py)
        }
        Value::Object(fields) => {
            let dict = PyDict::new_bound(py);
            for (k, v) in fields {
                dict.set_item(k, value_to_py(py, v)?)?;
            }
            dict.into_py(py)
        }
    })
}
