//! The self-test payload (`role: "selftest"`, SPEC §4.8): input rows and the outputs the
//! packer's engine computed for them, with a tolerance. An agent runs it on the model it is
//! about to activate and refuses the bundle (`selftest_failed`) when any value differs by more
//! than the tolerance.

use crate::bundle::Manifest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `format` of this payload.
pub const FORMAT: u32 = 1;
/// Rows a self-test may hold: it runs on every activation, so it stays small.
pub const MAX_ROWS: usize = 1024;
/// Input values a self-test may hold over all its rows (a tensor model's rows are wide).
pub const MAX_VALUES: usize = 1 << 22;

/// How far an output may be from the expected value: `|got - want| <= absolute + relative * |want|`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerance {
    pub absolute: f64,
    pub relative: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            absolute: 1e-5,
            relative: 1e-4,
        }
    }
}

impl Tolerance {
    pub fn accepts(&self, got: f64, want: f64) -> bool {
        (got - want).abs() <= self.absolute + self.relative * want.abs()
    }
}

/// `selftest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selftest {
    pub format: u32,
    /// Input rows, each in the manifest's feature order.
    pub rows: Vec<Vec<f32>>,
    /// For each manifest output, by name: one array per row of that output's values, flattened.
    pub expected: BTreeMap<String, Vec<Vec<f64>>>,
    pub tolerance: Tolerance,
}

/// The first value that is off, or a shape that differs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Mismatch {
    #[error("output {output:?} row {row} value {index}: got {got}, expected {want} (tolerance {absolute} + {relative} x |expected|)")]
    Value {
        output: String,
        row: usize,
        index: usize,
        got: f64,
        want: f64,
        absolute: f64,
        relative: f64,
    },
    #[error("output {output:?} row {row}: got {got} values, expected {want}")]
    Width {
        output: String,
        row: usize,
        got: usize,
        want: usize,
    },
    #[error("output {output:?} is missing from the model's results")]
    Missing { output: String },
}

impl Selftest {
    /// Parse and check a self-test against the manifest it is signed with.
    pub fn parse(bytes: &[u8], manifest: &Manifest) -> Result<Selftest, String> {
        let t: Selftest = serde_json::from_slice(bytes).map_err(|e| format!("not a self-test: {e}"))?;
        t.check(manifest)?;
        Ok(t)
    }

    /// The rules of SPEC §4.8.
    pub fn check(&self, manifest: &Manifest) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {} is not supported (expected {FORMAT})", self.format));
        }
        if self.rows.is_empty() || self.rows.len() > MAX_ROWS {
            return Err(format!("{} rows; a self-test holds 1 to {MAX_ROWS}", self.rows.len()));
        }
        let width = manifest.width();
        if self.rows.len().saturating_mul(width) > MAX_VALUES {
            return Err(format!(
                "{} rows of {width} values; a self-test holds at most {MAX_VALUES} values",
                self.rows.len()
            ));
        }
        for (i, r) in self.rows.iter().enumerate() {
            if r.len() != width {
                return Err(format!(
                    "row {i} has {} values; the manifest's inputs take {width}",
                    r.len()
                ));
            }
            if r.iter().any(|v| !v.is_finite()) {
                return Err(format!("row {i} holds a value that is not finite"));
            }
        }
        let names: Vec<&str> = manifest.outputs.iter().map(|o| o.name.as_str()).collect();
        let have: Vec<&str> = self.expected.keys().map(String::as_str).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        if sorted != have {
            return Err(format!("expected outputs {have:?}; the manifest's are {names:?}"));
        }
        for (name, rows) in &self.expected {
            if rows.len() != self.rows.len() {
                return Err(format!(
                    "output {name:?} has {} rows of expected values for {} input rows",
                    rows.len(),
                    self.rows.len()
                ));
            }
            if let Some(row) = rows.iter().position(|r| r.iter().any(|v| !v.is_finite())) {
                return Err(format!(
                    "output {name:?} is not finite on row {row}; a self-test needs finite outputs"
                ));
            }
        }
        let t = self.tolerance;
        if !(t.absolute.is_finite() && t.relative.is_finite() && t.absolute >= 0.0 && t.relative >= 0.0) {
            return Err("tolerance must be finite and not negative".into());
        }
        Ok(())
    }

    /// Compare a model's results, given as row `row` of output `name`, with the expected ones.
    pub fn compare<'a>(&self, got: impl Fn(&str, usize) -> Option<&'a [f64]>) -> Result<(), Mismatch> {
        let t = self.tolerance;
        for (output, rows) in &self.expected {
            for (row, want) in rows.iter().enumerate() {
                let g = got(output, row).ok_or_else(|| Mismatch::Missing { output: output.clone() })?;
                if g.len() != want.len() {
                    return Err(Mismatch::Width {
                        output: output.clone(),
                        row,
                        got: g.len(),
                        want: want.len(),
                    });
                }
                if let Some(index) = g.iter().zip(want).position(|(a, b)| !t.accepts(*a, *b)) {
                    return Err(Mismatch::Value {
                        output: output.clone(),
                        row,
                        index,
                        got: g[index],
                        want: want[index],
                        absolute: t.absolute,
                        relative: t.relative,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{InputSchema, OutputSchema};

    fn manifest() -> Manifest {
        Manifest {
            format: 1,
            name: "m".into(),
            version: 1,
            created: 1,
            expires: 2,
            payloads: vec![],
            input: Some(InputSchema {
                name: "X".into(),
                dtype: "float32".into(),
                features: vec!["a".into(), "b".into()],
                accepts_missing: false,
            }),
            inputs: None,
            outputs: vec![
                OutputSchema {
                    name: "label".into(),
                    dtype: "int64".into(),
                },
                OutputSchema {
                    name: "p".into(),
                    dtype: "float32".into(),
                },
            ],
        }
    }

    const GOOD: &str = r#"{"format":1,"rows":[[1,2],[3,4]],
        "expected":{"label":[[1],[0]],"p":[[0.25,0.75],[0.5,0.5]]},
        "tolerance":{"absolute":0.00001,"relative":0.0001}}"#;

    fn check(json: &str, want: Result<(), &str>) {
        match (Selftest::parse(json.as_bytes(), &manifest()), want) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(w)) => assert!(e.contains(w), "{json}: {e}"),
            (got, want) => panic!("{json}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parse_checks_against_the_manifest() {
        check(GOOD, Ok(()));
        check(&GOOD.replace("\"format\":1", "\"format\":2"), Err("format 2"));
        check(&GOOD.replace("[[1,2],[3,4]]", "[[1,2],[3]]"), Err("row 1 has 1 values"));
        check(&GOOD.replace("[[1,2],[3,4]]", "[]"), Err("0 rows"));
        check(&GOOD.replace("\"p\":", "\"q\":"), Err("the manifest's are"));
        check(
            &GOOD.replace("[[1],[0]]", "[[1]]"),
            Err("1 rows of expected values for 2"),
        );
        check(
            &GOOD.replace("\"absolute\":0.00001", "\"absolute\":-1"),
            Err("not negative"),
        );
        check(
            &GOOD.replace("\"format\":1,", "\"format\":1,\"extra\":0,"),
            Err("unknown field"),
        );
        check("[]", Err("not a self-test"));
        // JSON cannot carry NaN, but a packer's engine can compute it.
        let mut nan = Selftest::parse(GOOD.as_bytes(), &manifest()).expect("good");
        nan.expected.get_mut("p").expect("p")[1][0] = f64::NAN;
        let e = nan.check(&manifest()).expect_err("NaN expected");
        assert!(e.starts_with("output \"p\" is not finite on row 1"), "{e}");
    }

    #[test]
    fn compare_names_the_output_and_row() {
        let t = Selftest::parse(GOOD.as_bytes(), &manifest()).expect("good");
        let label: Vec<Vec<f64>> = vec![vec![1.0], vec![0.0]];
        let p: Vec<Vec<f64>> = vec![vec![0.25, 0.75], vec![0.5, 0.50001]];
        let got = |o: &str, r: usize| match o {
            "label" => Some(label[r].as_slice()),
            "p" => Some(p[r].as_slice()),
            _ => None,
        };
        assert_eq!(t.compare(got), Ok(()));
        let off: Vec<Vec<f64>> = vec![vec![0.25, 0.75], vec![0.5, 0.6]];
        let got = |o: &str, r: usize| match o {
            "label" => Some(label[r].as_slice()),
            "p" => Some(off[r].as_slice()),
            _ => None,
        };
        let e = t.compare(got).expect_err("0.6 is not 0.5");
        assert!(
            e.to_string()
                .starts_with("output \"p\" row 1 value 1: got 0.6, expected 0.5"),
            "{e}"
        );
    }
}
