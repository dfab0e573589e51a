//! Canonical JSON, the encoding that bundle signatures cover.
//!
//! The rules (SPEC.md §4.2): no insignificant white space; object members sorted by the
//! bytes of their UTF-8 keys; integers only (no fractions, no exponents, no floats);
//! strings escaped with the short forms `\" \\ \b \f \n \r \t`, other control characters as
//! `\u00xx` in lowercase hex, and every other character as itself (UTF-8, `/` unescaped).
//! Strings and integers are written by `serde_json`, whose escaping is exactly this; objects
//! are sorted here, so the result does not depend on how `serde_json`'s map is ordered.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("number {0} is not an integer; canonical JSON allows integers only")]
    NotInteger(String),
}

/// Encode a JSON value canonically.
pub fn encode(v: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::new();
    write(v, &mut out)?;
    Ok(out)
}

fn write(v: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match v {
        Value::Number(n) if !(n.is_i64() || n.is_u64()) => return Err(CanonicalError::NotInteger(n.to_string())),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(x, out)?;
            }
            out.push(b']');
        }
        Value::Object(o) => {
            let mut members: Vec<(&String, &Value)> = o.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, x)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write(x, out)?;
            }
            out.push(b'}');
        }
        scalar_value => scalar(scalar_value, out),
    }
    Ok(())
}

fn scalar(v: &Value, out: &mut Vec<u8>) {
    out.extend_from_slice(&serde_json::to_vec(v).expect("serializing a JSON scalar cannot fail"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value, expected: &str) {
        assert_eq!(String::from_utf8(encode(&v).expect("encodes")).expect("utf8"), expected);
    }

    #[test]
    fn canonical_form() {
        check(
            json!({"b": 1, "a": [true, null, "x"]}),
            r#"{"a":[true,null,"x"],"b":1}"#,
        );
        check(json!({"é": 1, "z": 2, "Z": 3}), r#"{"Z":3,"z":2,"é":1}"#);
        check(
            json!("a/b\"c\\d\n\t\u{1}\u{7f}é"),
            "\"a/b\\\"c\\\\d\\n\\t\\u0001\u{7f}é\"",
        );
        check(json!(-12), "-12");
        check(json!(18446744073709551615u64), "18446744073709551615");
        check(json!({"nested": {"y": {}, "x": []}}), r#"{"nested":{"x":[],"y":{}}}"#);
    }

    #[test]
    fn floats_are_refused() {
        assert!(encode(&json!({"a": 1.5})).is_err());
        assert!(encode(&json!([1.0])).is_err());
    }
}
