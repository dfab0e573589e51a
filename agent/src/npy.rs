//! NumPy `.npy` files of float32 tensors (format 1.0, 2.0 and 3.0): what `numpy.save` writes
//! for an array of dtype `float32`. The header is checked before the data is read: magic,
//! version, a dict with `descr` `<f4` (little-endian float32), `fortran_order` False and a
//! shape whose element count matches the data, at most [`MAX_DIMS`] axes.

/// The most axes a tensor read here may have.
pub const MAX_DIMS: usize = 8;
/// The largest header read (numpy pads headers to 64 bytes; real ones are under 128).
const MAX_HEADER: usize = 64 << 10;

/// A float32 tensor: its shape and its values in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Whether `path` names a `.npy` file (by its extension, in any case).
pub fn is_npy(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"))
}

/// Read float32 `.npy` files; an error names the file.
pub fn read_files(paths: &[std::path::PathBuf]) -> Result<Vec<Tensor>, String> {
    paths
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            read_f32(&bytes).map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect()
}

/// Each input's shape after the sample axis, and the rows.
pub type Rows = (Vec<Vec<usize>>, Vec<Vec<f32>>);

/// Samples from one tensor per model input, each `[samples, …]` with the same number of
/// samples: each input's shape after the sample axis, and the rows (every input's values of
/// one sample, back to back, in input order), as the engine takes them.
pub fn rows(tensors: &[Tensor]) -> Result<Rows, String> {
    let Some(first) = tensors.first() else {
        return Err("no input tensors".into());
    };
    for (i, t) in tensors.iter().enumerate() {
        if t.shape.len() < 2 || t.shape.contains(&0) {
            return Err(format!(
                "input {i} has shape {:?}; it holds [samples, …] with at least one sample of at least one value",
                t.shape
            ));
        }
        if t.shape[0] != first.shape[0] {
            return Err(format!(
                "input {i} has {} samples; input 0 has {}",
                t.shape[0], first.shape[0]
            ));
        }
    }
    let n = first.shape[0];
    let rows = (0..n)
        .map(|i| {
            tensors
                .iter()
                .flat_map(|t| {
                    let k = t.values.len() / n;
                    t.values[i * k..(i + 1) * k].iter().copied()
                })
                .collect()
        })
        .collect();
    Ok((tensors.iter().map(|t| t.shape[1..].to_vec()).collect(), rows))
}

/// Read a `.npy` file's bytes.
pub fn read_f32(bytes: &[u8]) -> Result<Tensor, String> {
    let rest = bytes
        .strip_prefix(b"\x93NUMPY")
        .ok_or("not a .npy file (no \\x93NUMPY magic)")?;
    let (major, rest) = rest.split_first().ok_or("truncated .npy header")?;
    let rest = rest.get(1..).ok_or("truncated .npy header")?;
    let (len, rest) = match major {
        1 => {
            let b = rest.get(..2).ok_or("truncated .npy header")?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, &rest[2..])
        }
        2 | 3 => {
            let b = rest.get(..4).ok_or("truncated .npy header")?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, &rest[4..])
        }
        v => return Err(format!(".npy format version {v} is not supported (1 to 3 are)")),
    };
    if len > MAX_HEADER {
        return Err(format!(".npy header of {len} bytes is larger than {MAX_HEADER}"));
    }
    let header = rest.get(..len).ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| ".npy header is not text")?;
    let data = &rest[len..];
    let descr = value_of(header, "descr").ok_or(".npy header has no descr")?;
    if descr.trim_matches(|c| c == '\'' || c == '"') != "<f4" {
        return Err(format!(
            ".npy array has dtype {descr}; float32 (<f4) is needed: save it with x.astype(numpy.float32)"
        ));
    }
    if value_of(header, "fortran_order").map(str::trim) != Some("False") {
        return Err(".npy array is in Fortran order; save a C-ordered array (numpy.ascontiguousarray)".into());
    }
    let shape_text = value_of(header, "shape").ok_or(".npy header has no shape")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!(".npy shape {shape_text} is not a shape"))
        })
        .collect::<Result<_, _>>()?;
    if shape.len() > MAX_DIMS {
        return Err(format!(".npy array has {} axes, at most {MAX_DIMS}", shape.len()));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .ok_or_else(|| format!(".npy shape {shape_text} is too large"))?;
    if count.checked_mul(4) != Some(data.len()) {
        return Err(format!(
            ".npy shape {shape_text} needs {count} float32 values; the file holds {} bytes of data",
            data.len()
        ));
    }
    let values = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Tensor { shape, values })
}

/// The text of `key`'s value in a `.npy` header dict: up to the next top-level comma or the
/// closing brace (a shape's tuple is kept whole).
fn value_of<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What numpy 1.x/2.x writes for `np.save(f, np.arange(6, dtype=np.float32).reshape(2, 3))`.
    fn npy(header: &str, values: &[f32]) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((h.len() as u16).to_le_bytes());
        out.extend(h.as_bytes());
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        out
    }

    #[test]
    fn reads_what_numpy_writes() {
        let v: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let t = read_f32(&npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", &v)).expect("read");
        assert_eq!(t.shape, [2, 3]);
        assert_eq!(t.values, v);
        let one = read_f32(&npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
            &v[..3],
        ))
        .expect("1-d");
        assert_eq!(one.shape, [3]);
        let scalar = read_f32(&npy("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", &v[..1])).expect("0-d");
        assert!(scalar.shape.is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_read_plainly() {
        let v = [0f32; 6];
        for (header, values, want) in [
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
                &v[..],
                "float32",
            ),
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
                &v[..],
                "Fortran",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }",
                &v[..],
                "needs 8",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }",
                &v[..],
                "not a shape",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999, 99999999999), }",
                &v[..],
                "too large",
            ),
        ] {
            let e = read_f32(&npy(header, values)).expect_err(header);
            assert!(e.contains(want), "{header}: {e}");
        }
        assert!(read_f32(b"PK\x03\x04").expect_err("zip").contains("magic"));
        assert!(read_f32(b"\x93NUMPY\x01\x00\xff")
            .expect_err("short")
            .contains("truncated"));
    }
}
