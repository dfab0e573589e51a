//! Readings in, predictions out.
//!
//! A reading is a JSON object whose members name the model's input features (a tabular
//! model) or its input tensors (a tensor model), or an array of such objects. It is
//! deserialised straight into the row: members the model does not use are skipped without
//! being buffered, and an optional `id` is echoed in the prediction, cut to
//! `inputs.max_id_bytes`. A tensor is given as nested or flat arrays of numbers, as base64 of
//! little-endian float32, or, for an image input, as a JPEG or PNG image. A reading on a
//! binary topic is raw little-endian float32 rows, or an image. A reading that lacks a value,
//! or gives one that is not a finite number or does not fit the input's shape, is refused and
//! counted, and an `input_rejected` event says why (at most one a minute).
//!
//! The task drains queued readings until it has `max_batch` rows and runs them through the
//! shared plan, `max_batch` rows per call, on a blocking thread, off the async runtime. The
//! predictions go to the outbox, which publishes them live once they are durable; the QoS 1
//! readings they came from are PUBACKed then.

use crate::deploy::{event, ActiveModel, SharedModel};
use crate::drift;
use crate::engine::{Column, Outputs};
use crate::link::{PubAck, Reading};
use crate::metrics::Metrics;
use crate::queue::Held;
use crate::samples::{self, Sampler};
use crate::store::{cause, Loss, NewRecord};
use crate::sync::{now_ms, Append, Outbox, Outgoing};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use protocol::bundle::{ImagePlan, Manifest, TensorSchema};
use protocol::messages::ModelRef;
use protocol::messages::{Level, Prediction};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// A model's inputs and where each value goes in a row, built once per model: the feature
/// names of a tabular model, or the input tensors of a tensor model (manifest format 2).
#[derive(Debug, Clone)]
pub struct Features {
    /// Feature names (tabular), or input names (tensors).
    names: Vec<String>,
    index: HashMap<String, usize>,
    /// A `null` feature is a missing value (NaN) rather than a refusal (SPEC §3.7).
    accepts_missing: bool,
    /// A tensor model's inputs, in model order; empty for a tabular model.
    tensors: Vec<TensorInput>,
    /// Values in a row.
    width: usize,
}

/// One input of a tensor model: where its values sit in a row, and how an image becomes it.
#[derive(Debug, Clone)]
pub struct TensorInput {
    pub name: String,
    /// The dimensions after the batch axis.
    pub shape: Vec<usize>,
    offset: usize,
    values: usize,
    image: Option<ImagePlan>,
}

impl Features {
    /// A tabular model's features.
    pub fn new(names: &[String]) -> Features {
        Features {
            names: names.to_vec(),
            index: names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect(),
            accepts_missing: false,
            tensors: vec![],
            width: names.len(),
        }
    }

    /// A tensor model's inputs.
    pub fn tensors(inputs: &[TensorSchema]) -> Result<Features, String> {
        let mut tensors = Vec::with_capacity(inputs.len());
        let mut offset = 0;
        for t in inputs {
            let values = t.values();
            tensors.push(TensorInput {
                name: t.name.clone(),
                shape: t.shape.iter().map(|d| *d as usize).collect(),
                offset,
                values,
                image: t
                    .image
                    .as_ref()
                    .map(|i| i.plan(&t.shape))
                    .transpose()
                    .map_err(|e| format!("input {:?}: {e}", t.name))?,
            });
            offset += values;
        }
        Ok(Features {
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            index: tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
            accepts_missing: false,
            tensors,
            width: offset,
        })
    }

    /// The inputs a verified manifest describes.
    pub fn for_manifest(m: &Manifest) -> Result<Features, String> {
        match m.features() {
            Some(input) => Ok(Features::new(&input.features).accepting_missing(input.accepts_missing)),
            None => Features::tensors(m.inputs.as_deref().unwrap_or_default()),
        }
    }

    /// Features of a model that handles missing values: `null` becomes NaN.
    pub fn accepting_missing(mut self, yes: bool) -> Features {
        self.accepts_missing = yes;
        self
    }

    /// Values in a row: a tabular model's feature count, or a tensor model's values per
    /// sample over every input.
    pub fn len(&self) -> usize {
        self.width
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0
    }

    /// A tensor model's inputs, in model order; empty for a tabular model.
    pub fn inputs(&self) -> &[TensorInput] {
        &self.tensors
    }
}

/// What a reading may hold, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// An echoed `id` is cut to this many bytes of JSON (`inputs.max_id_bytes`).
    pub max_id: usize,
    /// The most pixels an image may have (`inputs.max_image_pixels`).
    pub max_image_pixels: u64,
    /// The most input values one reading message may make, over all its rows
    /// (`inputs.max_batch_bytes` / 4): checked before each row is made.
    pub max_values: usize,
}

impl Limits {
    /// Refuse a message whose rows would hold more than `max_values` values once one more row
    /// of `width` is added to the `made` it has. One row always fits.
    fn room(&self, made: usize, width: usize) -> Result<(), String> {
        if made > 0 && made + width > self.max_values {
            return Err(format!(
                "the reading holds more than {} input values (inputs.max_batch_bytes / 4); send fewer rows per message",
                self.max_values
            ));
        }
        Ok(())
    }
}

/// Rows parsed from readings: values back to back, and each row's echoed id (JSON).
#[derive(Debug, Default, Clone)]
pub struct Rows {
    pub values: Vec<f32>,
    pub ids: Vec<Option<Box<RawValue>>>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Parse a reading into `out`, adding its rows; on error nothing is added. Returns the number
/// of rows. The caller has checked the payload's size.
pub fn parse_reading(payload: &[u8], features: &Features, limits: &Limits, out: &mut Rows) -> Result<usize, String> {
    let (v0, i0) = (out.values.len(), out.ids.len());
    let mut de = serde_json::Deserializer::from_slice(payload);
    let result = ReadingSeed {
        features,
        limits,
        first: v0,
        out: &mut *out,
    }
    .deserialize(&mut de)
    .and_then(|n| de.end().map(|()| n));
    match result {
        Ok(n) => Ok(n),
        Err(e) => {
            out.values.truncate(v0);
            out.ids.truncate(i0);
            Err(if e.is_syntax() || e.is_eof() {
                format!("not JSON: {e}")
            } else {
                e.to_string()
            })
        }
    }
}

/// Parse a binary reading into `out` (SPEC §3.7): a JPEG or PNG image for a model whose one
/// input is an image, or else rows of little-endian float32 values, back to back. On error
/// nothing is added. Returns the number of rows.
pub fn parse_binary(payload: &[u8], features: &Features, limits: &Limits, out: &mut Rows) -> Result<usize, String> {
    let w = features.width;
    let image = match features.tensors.as_slice() {
        [t] => t.image.as_ref(),
        _ => None,
    };
    if let (Some(plan), Some(_)) = (image, crate::image::kind(payload)) {
        let start = out.values.len();
        out.values.resize(start + w, 0.0);
        if let Err(e) = crate::image::preprocess(payload, plan, limits.max_image_pixels, &mut out.values[start..]) {
            out.values.truncate(start);
            return Err(e);
        }
        out.ids.push(None);
        return Ok(1);
    }
    let row_bytes = w * 4;
    if payload.len() > row_bytes {
        limits.room(row_bytes / 4, payload.len() / 4 - row_bytes / 4)?;
    }
    if payload.is_empty() || row_bytes == 0 || !payload.len().is_multiple_of(row_bytes) {
        return Err(format!(
            "a binary reading for this model is rows of {w} little-endian float32 values ({row_bytes} bytes each){}; this one has {} bytes",
            if image.is_some() { ", or a JPEG or PNG image" } else { "" },
            payload.len()
        ));
    }
    let start = out.values.len();
    for (i, b) in payload.chunks_exact(4).enumerate() {
        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let missing = v.is_nan() && features.accepts_missing;
        if !v.is_finite() && !missing {
            out.values.truncate(start);
            return Err(format!("value {} of row {} is not finite ({v})", i % w, i / w));
        }
        out.values.push(v);
    }
    let n = payload.len() / row_bytes;
    out.ids.extend(std::iter::repeat_n(None, n));
    Ok(n)
}

/// Parse a reading, binary or JSON, into `out`.
fn parse_message(
    payload: &[u8],
    binary: bool,
    features: &Features,
    limits: &Limits,
    out: &mut Rows,
) -> Result<usize, String> {
    if binary {
        parse_binary(payload, features, limits, out)
    } else {
        parse_reading(payload, features, limits, out)
    }
}

struct ReadingSeed<'a> {
    features: &'a Features,
    limits: &'a Limits,
    /// Where this message's values start in `out`.
    first: usize,
    out: &'a mut Rows,
}

impl<'de> DeserializeSeed<'de> for ReadingSeed<'_> {
    type Value = usize;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ReadingSeed<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object or an array of objects")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<usize, A::Error> {
        RowVisitor {
            features: self.features,
            limits: self.limits,
            first: self.first,
            out: self.out,
        }
        .visit_map(map)
        .map(|()| 1)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while seq
            .next_element_seed(RowVisitor {
                features: self.features,
                limits: self.limits,
                first: self.first,
                out: &mut *self.out,
            })?
            .is_some()
        {
            n += 1;
        }
        if n == 0 {
            return Err(de::Error::custom("empty array"));
        }
        Ok(n)
    }
}

struct RowVisitor<'a> {
    features: &'a Features,
    limits: &'a Limits,
    /// Where this message's values start in `out`.
    first: usize,
    out: &'a mut Rows,
}

impl<'de> DeserializeSeed<'de> for RowVisitor<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// A member name, borrowed from the payload when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A feature value: a JSON number finite in float32, or `null` (NaN) for a model that accepts
/// missing values.
struct Feature<'a>(&'a str, bool);

impl<'de> DeserializeSeed<'de> for Feature<'_> {
    type Value = f32;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<f32, D::Error> {
        d.deserialize_any(self)
    }
}

impl Feature<'_> {
    fn finite<E: de::Error>(&self, x: f64) -> Result<f32, E> {
        crate::engine::feature_value(x)
            .ok_or_else(|| E::custom(format!("feature {:?} is out of float32 range", self.0)))
    }

    fn not_a_number<E: de::Error>(&self, what: &str) -> Result<f32, E> {
        Err(E::custom(format!("feature {:?} is {what}, not a number", self.0)))
    }
}

impl<'de> Visitor<'de> for Feature<'_> {
    type Value = f32;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f32, E> {
        self.finite(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f32, E> {
        self.finite(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f32, E> {
        self.finite(v as f64)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<f32, E> {
        self.not_a_number("a string")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<f32, E> {
        self.not_a_number("a boolean")
    }
    fn visit_unit<E: de::Error>(self) -> Result<f32, E> {
        if self.1 {
            Ok(f32::NAN)
        } else {
            self.not_a_number("null (this model does not take missing values)")
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<f32, A::Error> {
        self.not_a_number("an array")
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<f32, A::Error> {
        self.not_a_number("an object")
    }
}

/// An echoed id: the JSON as sent when it is short, else a string of its first bytes.
fn bounded_id(raw: &RawValue, max: usize) -> Box<RawValue> {
    let text = raw.get();
    if text.len() <= max {
        return raw.to_owned();
    }
    let cut = protocol::messages::echo(text, max.saturating_sub(24).max(8));
    RawValue::from_string(serde_json::to_string(&cut).expect("a string serializes")).expect("a JSON string is JSON")
}

impl<'de> Visitor<'de> for RowVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of features")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if !self.features.tensors.is_empty() {
            return self.tensor_row(map);
        }
        let n = self.features.len();
        let start = self.out.values.len();
        self.limits.room(start - self.first, n).map_err(de::Error::custom)?;
        self.out.values.resize(start + n, f32::NAN);
        let mut seen = vec![false; n];
        let mut id = None;
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            if k == "id" {
                let raw: &'de RawValue = map.next_value()?;
                id = Some(bounded_id(raw, self.limits.max_id));
            } else if let Some(&i) = self.features.index.get(k.as_ref()) {
                if seen[i] {
                    return Err(de::Error::custom(format!(
                        "feature {:?} is given twice",
                        self.features.names[i]
                    )));
                }
                seen[i] = true;
                self.out.values[start + i] =
                    map.next_value_seed(Feature(&self.features.names[i], self.features.accepts_missing))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(de::Error::custom(format!(
                "feature {:?} is missing",
                self.features.names[i]
            )));
        }
        self.out.ids.push(id);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom("array element is not an object"))
    }
}

impl<'a> RowVisitor<'a> {
    /// A tensor model's row: one member per input, in any order.
    fn tensor_row<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let start = self.out.values.len();
        self.limits
            .room(start - self.first, self.features.width)
            .map_err(de::Error::custom)?;
        self.out.values.resize(start + self.features.width, 0.0);
        let mut seen = vec![false; self.features.tensors.len()];
        let mut id = None;
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            if k == "id" {
                let raw: &'de RawValue = map.next_value()?;
                id = Some(bounded_id(raw, self.limits.max_id));
            } else if let Some(&i) = self.features.index.get(k.as_ref()) {
                let t = &self.features.tensors[i];
                if seen[i] {
                    return Err(de::Error::custom(format!("input {:?} is given twice", t.name)));
                }
                seen[i] = true;
                let at = start + t.offset;
                map.next_value_seed(TensorValue {
                    input: t,
                    fill: Fill {
                        name: &t.name,
                        out: &mut self.out.values[at..at + t.values],
                        pos: 0,
                    },
                    max_image_pixels: self.limits.max_image_pixels,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(de::Error::custom(format!(
                "input {:?} is missing",
                self.features.tensors[i].name
            )));
        }
        self.out.ids.push(id);
        Ok(())
    }
}

/// An input's values as they are read: written in order into its place in the row.
struct Fill<'a> {
    name: &'a str,
    out: &'a mut [f32],
    pos: usize,
}

impl Fill<'_> {
    fn push<E: de::Error>(&mut self, x: f64) -> Result<(), E> {
        let v = crate::engine::feature_value(x)
            .ok_or_else(|| E::custom(format!("input {:?} holds a value out of float32 range", self.name)))?;
        let len = self.out.len();
        let slot = self
            .out
            .get_mut(self.pos)
            .ok_or_else(|| E::custom(format!("input {:?} takes {len} values; more were given", self.name)))?;
        *slot = v;
        self.pos += 1;
        Ok(())
    }

    fn not_a_number<E: de::Error>(&self, what: &str) -> E {
        E::custom(format!("input {:?} holds {what}, not a number", self.name))
    }
}

/// An input tensor in a JSON reading: a number (an input of one value), an array (flat, or
/// nested as the input's shape), or an object with `data`, `b64` (little-endian float32) or,
/// for an image input, `image` (base64 of a JPEG or PNG file), and optionally `shape` and
/// `dtype`.
struct TensorValue<'a> {
    input: &'a TensorInput,
    fill: Fill<'a>,
    max_image_pixels: u64,
}

impl TensorValue<'_> {
    fn shape(&self) -> String {
        format!("{:?}", self.input.shape)
    }
}

impl<'de> DeserializeSeed<'de> for TensorValue<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TensorValue<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a tensor of shape {} (an array, or an object with data, b64 or image)",
            self.shape()
        )
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<(), E> {
        if self.input.values != 1 {
            return Err(E::custom(format!(
                "input {:?} has shape {} ({} values); one number was given",
                self.input.name,
                self.shape(),
                self.input.values
            )));
        }
        self.fill.push(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(self.fill.not_a_number("a string"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(self.fill.not_a_number("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.fill.not_a_number("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, seq: A) -> Result<(), A::Error> {
        top_array(&mut self.fill, &self.input.shape, seq)
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let name = &self.input.name;
        let mut shape: Option<Vec<u64>> = None;
        let mut given = 0;
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "shape" => shape = Some(map.next_value()?),
                "dtype" => {
                    let d = map.next_value::<Key<'de>>()?.0;
                    if d != "float32" {
                        return Err(de::Error::custom(format!("input {name:?}: dtype {d:?} is not float32")));
                    }
                }
                "data" => {
                    given += 1;
                    map.next_value_seed(ArraySeed {
                        fill: &mut self.fill,
                        dims: &self.input.shape,
                    })?;
                }
                "b64" => {
                    given += 1;
                    let text = map.next_value::<Key<'de>>()?.0;
                    let bytes = B64
                        .decode(text.as_bytes())
                        .map_err(|e| de::Error::custom(format!("input {name:?}: b64 is not base64: {e}")))?;
                    if bytes.len() != self.fill.out.len() * 4 {
                        return Err(de::Error::custom(format!(
                            "input {name:?}: b64 holds {} bytes; shape {:?} takes {} float32 values ({} bytes)",
                            bytes.len(),
                            self.input.shape,
                            self.fill.out.len(),
                            self.fill.out.len() * 4
                        )));
                    }
                    self.fill.pos = 0;
                    for b in bytes.chunks_exact(4) {
                        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        if !v.is_finite() {
                            return Err(de::Error::custom(format!(
                                "input {name:?} holds a value that is not finite"
                            )));
                        }
                        self.fill.push::<A::Error>(f64::from(v))?;
                    }
                }
                "image" => {
                    given += 1;
                    let Some(plan) = &self.input.image else {
                        return Err(de::Error::custom(format!(
                            "input {name:?} is not an image input: give its values (data or b64)"
                        )));
                    };
                    let text = map.next_value::<Key<'de>>()?.0;
                    let bytes = B64
                        .decode(text.as_bytes())
                        .map_err(|e| de::Error::custom(format!("input {name:?}: image is not base64: {e}")))?;
                    crate::image::preprocess(&bytes, plan, self.max_image_pixels, self.fill.out)
                        .map_err(|e| de::Error::custom(format!("input {name:?}: {e}")))?;
                    self.fill.pos = self.fill.out.len();
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if given != 1 {
            return Err(de::Error::custom(format!(
                "input {name:?}: give exactly one of data, b64{}",
                if self.input.image.is_some() { " or image" } else { "" }
            )));
        }
        if let Some(s) = shape {
            let same = |s: &[u64]| s.iter().map(|d| *d as usize).eq(self.input.shape.iter().copied());
            if !(same(&s) || (s.first() == Some(&1) && same(&s[1..]))) {
                return Err(de::Error::custom(format!(
                    "input {name:?}: shape {s:?} is not the input's shape {}",
                    self.shape()
                )));
            }
        }
        if self.fill.pos != self.fill.out.len() {
            return Err(de::Error::custom(format!(
                "input {name:?} takes {} values; {} were given",
                self.fill.out.len(),
                self.fill.pos
            )));
        }
        Ok(())
    }
}

/// The values of a tensor as an array: flat (every value, in row-major order) or nested as its
/// shape.
fn top_array<'de, A: SeqAccess<'de>>(fill: &mut Fill<'_>, dims: &[usize], mut seq: A) -> Result<(), A::Error> {
    let (mut numbers, mut arrays) = (0usize, 0usize);
    while let Some(kind) = seq.next_element_seed(Item {
        fill: &mut *fill,
        rest: dims.get(1..).unwrap_or_default(),
        flat_ok: arrays == 0,
        array_ok: numbers == 0,
    })? {
        match kind {
            ItemKind::Number => numbers += 1,
            ItemKind::Array => arrays += 1,
        }
        if arrays > 0 && numbers > 0 {
            return Err(de::Error::custom(format!(
                "input {:?} mixes numbers and arrays",
                fill.name
            )));
        }
    }
    if fill.pos != fill.out.len() || (arrays > 0 && arrays != dims[0]) {
        return Err(de::Error::custom(format!(
            "input {:?} takes {} values (shape {dims:?}); {} were given",
            fill.name,
            fill.out.len(),
            fill.pos
        )));
    }
    Ok(())
}

/// A tensor's `data` member: an array as [`top_array`] reads it.
struct ArraySeed<'f, 'a> {
    fill: &'f mut Fill<'a>,
    dims: &'f [usize],
}

impl<'de> DeserializeSeed<'de> for ArraySeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ArraySeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        top_array(self.fill, self.dims, seq)
    }
}

enum ItemKind {
    Number,
    Array,
}

/// One entry of a tensor array: a number (in a flat array, or on the last axis), or an array
/// of the next axes.
struct Item<'f, 'a> {
    fill: &'f mut Fill<'a>,
    /// The axes below this entry's array; empty on the last axis.
    rest: &'f [usize],
    /// A number is allowed here (a flat array at the top, or the last axis).
    flat_ok: bool,
    /// An array is allowed here (not after numbers at the top).
    array_ok: bool,
}

impl<'de> DeserializeSeed<'de> for Item<'_, '_> {
    type Value = ItemKind;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ItemKind, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Item<'_, '_> {
    type Value = ItemKind;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or an array of numbers")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ItemKind, E> {
        if !self.flat_ok {
            return Err(E::custom(format!(
                "input {:?}: a number where an array of {} was expected",
                self.fill.name,
                self.rest.first().copied().unwrap_or(0)
            )));
        }
        self.fill.push(v).map(|()| ItemKind::Number)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ItemKind, E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ItemKind, E> {
        self.visit_f64(v as f64)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<ItemKind, E> {
        Err(self.fill.not_a_number("a string"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<ItemKind, E> {
        Err(self.fill.not_a_number("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<ItemKind, E> {
        Err(self.fill.not_a_number("null"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<ItemKind, A::Error> {
        Err(self.fill.not_a_number("an object"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ItemKind, A::Error> {
        let Some((&n, below)) = self.rest.split_first() else {
            return Err(de::Error::custom(format!(
                "input {:?} is nested deeper than its shape",
                self.fill.name
            )));
        };
        if !self.array_ok {
            return Err(de::Error::custom(format!(
                "input {:?} mixes numbers and arrays",
                self.fill.name
            )));
        }
        let mut k = 0;
        while k <= n
            && seq
                .next_element_seed(Item {
                    fill: &mut *self.fill,
                    rest: below,
                    flat_ok: below.is_empty(),
                    array_ok: true,
                })?
                .is_some()
        {
            k += 1;
        }
        if k != n {
            return Err(de::Error::custom(format!(
                "input {:?}: an axis of {n} entries has {}{k}",
                self.fill.name,
                if k > n { "more than " } else { "" }
            )));
        }
        Ok(ItemKind::Array)
    }
}

pub struct InferenceTask {
    pub rx: mpsc::Receiver<Held<Reading>>,
    pub active: SharedModel,
    pub outbox: Outbox,
    /// Publish predictions live (once durable).
    pub live: bool,
    pub max_batch: usize,
    /// Bytes of input values in one call: wide rows make smaller batches.
    pub max_batch_bytes: usize,
    pub limits: Limits,
    /// Topic filters whose readings are binary (SPEC §3.7).
    pub binary: Vec<String>,
    /// Outputs with at most this many values per row are sent whole; wider ones as their
    /// `top_k` largest values.
    pub max_output_values: usize,
    pub top_k: usize,
    pub metrics: Arc<Metrics>,
    /// How long this slot's inference calls take, for health.
    pub latency: Arc<crate::metrics::Latencies>,
    /// Drift and samples of the active model.
    pub watch: Watch,
    /// Ticks of the operator's drift schedule (`drift.schedule`).
    pub schedule: Option<mpsc::Receiver<()>>,
    /// Stamped at every turn, and at least every second while idle.
    pub beat: crate::systemd::Beat,
    /// Requests of the local API for this slot's model.
    pub api: Option<mpsc::Receiver<ApiCall>>,
}

/// Where predictions made for the local API say they came from.
pub const API_SOURCE: &str = "api";

/// A request of the local API (`[api]`): rows already checked against `model`. It is run like
/// readings (drift, samples, the watch period, predictions in the outbox), and answered once its
/// records are handed to the outbox.
pub struct ApiCall {
    pub model: Arc<ActiveModel>,
    pub rows: Rows,
    pub reply: tokio::sync::oneshot::Sender<Result<Outputs, String>>,
}

/// Drift windows and samples of the active model: what the inference task feeds the pure
/// trackers ([`crate::drift`], [`crate::samples`]) and the records they make.
pub struct Watch {
    /// `None` when drift is off in the config.
    policy: Option<drift::Policy>,
    repeat_alert_ms: u64,
    model: Option<Arc<ActiveModel>>,
    tracker: Option<drift::Tracker>,
    alerts: drift::Alerts,
    sampler: Sampler,
    /// Where `lathe status` finds this slot's drift state in the store's meta table.
    drift_key: String,
    /// The largest record the outbox takes (`outbox.max_record_bytes`): a tensor model's
    /// sample that could not fit is counted as lost before it is made.
    max_record_bytes: usize,
}

/// One inference call as the watch sees it: the rows (back to back), the model's outputs for
/// them, where each came from, and when.
#[derive(Clone, Copy)]
struct Ran<'a> {
    model: &'a ActiveModel,
    model_ref: &'a ModelRef,
    values: &'a [f32],
    outputs: &'a Outputs,
    sources: &'a [Arc<str>],
    ids: &'a [Option<Box<RawValue>>],
    ts_ms: u64,
}

/// Records and small state a step of the watch produced.
#[derive(Default)]
struct Made {
    records: Vec<Outgoing>,
    losses: Vec<Loss>,
    meta: Vec<(String, String)>,
    /// Drift windows closed in alert.
    alerts: u64,
}

impl Made {
    fn record(&mut self, stream: &'static str, ts_ms: u64, data: String, live: bool) {
        self.records.push(Outgoing {
            record: NewRecord { stream, ts_ms, data },
            live,
        });
    }
}

impl Watch {
    /// The watch of the model slot `slot` (`None`: the default slot).
    pub fn new(
        drift: &crate::config::DriftConfig,
        samples: crate::config::SamplesConfig,
        slot: Option<&str>,
        max_record_bytes: usize,
    ) -> Watch {
        Watch {
            max_record_bytes,
            drift_key: crate::config::slot_key("drift", slot),
            policy: drift.enabled.then(|| drift.policy()),
            repeat_alert_ms: drift.repeat_alert_secs * 1000,
            model: None,
            tracker: None,
            alerts: drift::Alerts::default(),
            sampler: Sampler::new(samples),
        }
    }

    /// Record the drift state for `lathe status`, under this slot's key.
    fn record_state(&self, state: &drift::DriftState, made: &mut Made) {
        made.meta.push((
            self.drift_key.clone(),
            serde_json::to_string(state).expect("drift state serializes"),
        ));
    }

    /// Follow the active model: a new one closes the old one's window and opens its own.
    fn follow(&mut self, model: &Option<Arc<ActiveModel>>, now: u64, made: &mut Made) {
        let same = match (&self.model, model) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        self.close(now, "model_change", made);
        self.model = model.clone();
        self.alerts = drift::Alerts::default();
        self.tracker = match (model, self.policy) {
            (Some(m), Some(policy)) => m
                .baseline
                .as_ref()
                .map(|b| drift::Tracker::new(m.model_ref(), b.clone(), policy, now)),
            _ => None,
        };
        if let Some(m) = model {
            let model = m.model_ref();
            if m.baseline.is_none() {
                info!(model = %model.name, version = model.version, "drift is off for this model: its bundle has no baseline");
            } else if self.policy.is_none() {
                info!(model = %model.name, version = model.version, "drift is off: drift.enabled = false");
            }
            let state = drift::DriftState {
                model,
                baseline: m.baseline.is_some(),
                enabled: self.policy.is_some(),
                window_start_ms: now,
                last: None,
            };
            self.record_state(&state, made);
        }
    }

    /// Count rows the model ran on, keep the samples due, and close the window if it is full.
    fn rows(&mut self, ran: &Ran, made: &mut Made) {
        let n = ran.values.len() / ran.model.features.len().max(1);
        let mut i = 0;
        while i < n {
            // Up to the end of the open window, which closes on count at its exact size.
            let end = match self.tracker.as_ref() {
                Some(t) => (i + t.room().max(1) as usize).min(n),
                None => n,
            };
            self.segment(ran, i..end, made);
            if let Some(why) = self.tracker.as_ref().and_then(|t| t.due(ran.ts_ms)) {
                self.close(ran.ts_ms, why, made);
            }
            i = end;
        }
    }

    /// Rows `range` of a batch: counted in the open window, sampled, held for an alert.
    fn segment(&mut self, ran: &Ran, range: std::ops::Range<usize>, made: &mut Made) {
        let Ran {
            model,
            model_ref,
            values,
            outputs,
            sources,
            ids,
            ts_ms,
        } = *ran;
        let width = model.features.len();
        let rows = &values[range.start * width..range.end * width];
        if let Some(t) = self.tracker.as_mut() {
            t.add(rows, outputs, range.start);
        }
        let baseline = model.baseline.as_deref();
        for (i, row) in range.clone().zip(rows.chunks_exact(width)) {
            let outside = self
                .tracker
                .as_ref()
                .and_then(|t| t.outside().get(i - range.start).copied());
            if let Some(reason) = self.sampler.pick(row, outputs, i, baseline, outside) {
                if !model.features.inputs().is_empty() && tensor_sample_bytes(width) > self.max_record_bytes {
                    push_loss(&mut made.losses, protocol::streams::SAMPLES, cause::OVERSIZE, 1);
                } else if self.sampler.admit(ts_ms) {
                    let out: Vec<(&str, &[f64])> = outputs.columns().iter().map(|c| (&*c.name, c.row(i))).collect();
                    let data = sample(
                        model,
                        model_ref,
                        reason,
                        &sources[i],
                        ids[i].as_deref(),
                        row,
                        &out,
                        ts_ms,
                    );
                    made.record(protocol::streams::SAMPLES, ts_ms, data, false);
                } else {
                    push_loss(&mut made.losses, protocol::streams::SAMPLES, cause::RATE_LIMITED, 1);
                }
            }
            if self.tracker.is_some() {
                self.sampler.hold(ts_ms, &sources[i], row, outputs, i);
            }
        }
    }

    /// When the open window is old enough to close on time, if it has the rows for it.
    fn deadline_ms(&self) -> Option<u64> {
        self.tracker.as_ref().and_then(|t| t.deadline_ms())
    }

    /// Close the open window, if it has rows: its record, an alert event if one is due, the
    /// rows held for an alert, and the state `lathe status` shows.
    fn close(&mut self, now: u64, why: &str, made: &mut Made) {
        let Some(t) = self.tracker.as_mut() else { return };
        if t.rows() == 0 {
            if why == "schedule" {
                // An empty scheduled window still ends: the next one starts at the schedule.
                t.reset(now);
            }
            return;
        }
        let w = t.close(now, why);
        made.record(
            protocol::streams::DRIFT,
            now,
            serde_json::to_string(&w).expect("a drift window serializes"),
            false,
        );
        let alerted = w.status == drift::Verdict::Alert;
        made.alerts += u64::from(alerted);
        if self.alerts.due(&w, self.repeat_alert_ms) {
            let message = drift::alert_message(&w);
            warn!(model = %w.model.name, version = w.model.version, %message, "drift alert");
            let e = event(Level::Warn, "drift_alert", message);
            made.record(
                protocol::streams::EVENTS,
                e.ts_ms,
                serde_json::to_string(&e).expect("an event serializes"),
                true,
            );
        }
        if let Some(model) = self.model.clone() {
            let model_ref = model.model_ref();
            for h in self.sampler.window_closed(alerted) {
                if !self.sampler.admit(now) {
                    push_loss(&mut made.losses, protocol::streams::SAMPLES, cause::RATE_LIMITED, 1);
                    continue;
                }
                let out: Vec<(&str, &[f64])> = h.outputs.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
                let data = sample(
                    &model,
                    &model_ref,
                    samples::Reason::DriftAlert,
                    &h.source,
                    None,
                    &h.values,
                    &out,
                    h.ts_ms,
                );
                made.record(protocol::streams::SAMPLES, h.ts_ms, data, false);
            }
            let state = drift::DriftState {
                model: model_ref,
                baseline: true,
                enabled: true,
                window_start_ms: now,
                last: Some(w),
            };
            self.record_state(&state, made);
        }
    }
}

/// The least a tensor model's sample of `width` values takes as a record: its inputs in base64.
fn tensor_sample_bytes(width: usize) -> usize {
    (width * 4).div_ceil(3) * 4
}

/// A sample record (SPEC §6.5).
#[allow(clippy::too_many_arguments)]
fn sample(
    model: &ActiveModel,
    model_ref: &ModelRef,
    reason: samples::Reason,
    source: &str,
    reading_id: Option<&RawValue>,
    row: &[f32],
    outputs: &[(&str, &[f64])],
    ts_ms: u64,
) -> String {
    let s = samples::Sample {
        ts_ms,
        model: model_ref,
        reason,
        source,
        reading_id,
        features: model
            .manifest
            .features()
            .map(|input| {
                input
                    .features
                    .iter()
                    .zip(row)
                    .map(|(n, v)| (n.as_str(), (!v.is_nan()).then_some(*v)))
                    .collect()
            })
            .unwrap_or_default(),
        inputs: model
            .features
            .inputs()
            .iter()
            .map(|t| {
                let values = &row[t.offset..t.offset + t.values];
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (
                    t.name.as_str(),
                    samples::TensorSample {
                        shape: t.shape.clone(),
                        b64: B64.encode(bytes),
                    },
                )
            })
            .collect(),
        outputs: outputs.iter().copied().collect(),
    };
    serde_json::to_string(&s).expect("a sample serializes")
}

/// A repeated trouble reported at once, then at most once a minute with the count since.
#[derive(Debug, Default)]
struct Reports {
    last: Option<Instant>,
    since: u64,
}

impl Reports {
    const EVERY: Duration = Duration::from_secs(60);

    /// Count `n` more; when a report is due, the count it covers.
    fn due(&mut self, n: u64) -> Option<u64> {
        self.since += n;
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}

/// Rows of a batch, where they came from, and the PUBACKs they owe.
struct Batch {
    rows: Rows,
    sources: Vec<(Arc<str>, usize)>,
    acks: Vec<PubAck>,
    losses: Vec<Loss>,
}

impl InferenceTask {
    /// Runs until shutdown or until the readings channel closes. A batch already taken is
    /// always finished and handed to the outbox.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut rejections = Reports::default();
        let mut failures = Reports::default();
        let mut schedule = self.schedule.take();
        let mut idle = tokio::time::interval(crate::systemd::IDLE_BEAT);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.beat.now();
            let deadline = self
                .watch
                .deadline_ms()
                .map(|d| tokio::time::Instant::now() + Duration::from_millis(d.saturating_sub(now_ms())));
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = at(deadline) => {
                    self.close_window("time").await;
                    continue;
                }
                Some(()) = tick(&mut schedule) => {
                    self.close_window("schedule").await;
                    continue;
                }
                r = self.rx.recv() => match r { Some(r) => r, None => break },
                Some(call) = api_call(&mut self.api) => {
                    self.serve(call, &mut failures).await;
                    continue;
                }
                _ = idle.tick() => continue,
            };
            let model = self.active.load_full();
            let mut made = Made::default();
            self.watch.follow(&model, now_ms(), &mut made);
            let mut batch = Batch {
                rows: Rows::default(),
                sources: vec![],
                acks: vec![],
                losses: vec![],
            };
            let mut events = vec![];
            let mut next = Some(first.into_inner());
            let rows_per_call = model.as_ref().map_or(self.max_batch, |m| self.rows_per_call(m));
            while let Some(r) = next.take() {
                let refused = match &model {
                    None => Some((
                        cause::NO_MODEL,
                        format!("reading on {} arrived with no model deployed", r.topic),
                    )),
                    Some(m) => match self.parse(&r, m, &mut batch.rows).await {
                        Ok(n) => {
                            match batch.sources.last_mut() {
                                Some((t, k)) if **t == *r.topic => *k += n,
                                _ => batch.sources.push((Arc::from(r.topic.as_str()), n)),
                            }
                            None
                        }
                        Err(e) => Some((
                            cause::MALFORMED,
                            format!("reading on {}: {e}", protocol::messages::echo(&r.topic, 128)),
                        )),
                    },
                };
                if let Some((why, reason)) = refused {
                    self.metrics.rejected.inc();
                    push_loss(&mut batch.losses, protocol::streams::READINGS, why, 1);
                    if let Some(n) = rejections.due(1) {
                        let msg = format!("{n} reading(s) refused; last: {reason}");
                        warn!(message = %msg, "input rejected");
                        events.push(event(Level::Warn, "input_rejected", msg));
                    }
                }
                batch.acks.extend(r.ack);
                if batch.rows.len() < rows_per_call {
                    next = self.rx.try_recv().ok().map(Held::into_inner);
                }
            }
            let mut records: Vec<Outgoing> = events
                .into_iter()
                .map(|e| Outgoing {
                    record: NewRecord {
                        stream: protocol::streams::EVENTS,
                        ts_ms: e.ts_ms,
                        data: serde_json::to_string(&e).expect("an event serializes"),
                    },
                    live: true,
                })
                .collect();
            if let (Some(m), false) = (model, batch.rows.is_empty()) {
                records.extend(self.infer(m, &mut batch, &mut failures, &mut made, None).await);
            }
            self.hand_over(records, batch, made).await;
        }
        // The open window's rows are not kept across a restart: report what it has.
        self.close_window("shutdown").await;
    }

    /// Hand a batch's records, with what drift and the sampler made of it, to the outbox.
    async fn hand_over(&mut self, mut records: Vec<Outgoing>, mut batch: Batch, made: Made) {
        self.metrics.drift_alerts.add(made.alerts);
        records.extend(made.records);
        batch.losses.extend(made.losses);
        let append = Append {
            records,
            losses: batch.losses,
            acks: batch.acks,
            meta: made.meta,
        };
        let bytes = append.bytes();
        if !self.outbox.send(append, bytes).await {
            warn!("outbox task is gone; predictions not buffered");
        }
    }

    /// Run a request of the local API as readings are run, hand its records to the outbox,
    /// then answer it: its outputs, or why its rows could not run.
    async fn serve(&mut self, call: ApiCall, failures: &mut Reports) {
        let model = self.active.load_full();
        let Some(m) = model.clone().filter(|m| Arc::ptr_eq(m, &call.model)) else {
            let _ = call
                .reply
                .send(Err("the model changed while the request waited; send it again".into()));
            return;
        };
        let mut made = Made::default();
        self.watch.follow(&model, now_ms(), &mut made);
        let n = call.rows.len();
        let mut batch = Batch {
            rows: call.rows,
            sources: vec![(Arc::from(API_SOURCE), n)],
            acks: vec![],
            losses: vec![],
        };
        let mut parts = vec![];
        let records = self.infer(m, &mut batch, failures, &mut made, Some(&mut parts)).await;
        self.hand_over(records, batch, made).await;
        let answer = parts
            .into_iter()
            .collect::<Result<Vec<Outputs>, String>>()
            .map(Outputs::concat);
        let _ = call.reply.send(answer);
    }

    /// The most rows run in one call for `model`: `max_batch`, fewer for wide rows so that a
    /// call's input stays within `max_batch_bytes`, and at least one.
    fn rows_per_call(&self, model: &ActiveModel) -> usize {
        let row_bytes = model.features.len().max(1) * 4;
        self.max_batch.min(self.max_batch_bytes / row_bytes).max(1)
    }

    /// Parse a reading as its topic says, binary or JSON, into `rows`. A model that takes
    /// images has its readings parsed off the async runtime: decoding is seconds of CPU at
    /// worst.
    async fn parse(&self, r: &Reading, m: &Arc<ActiveModel>, rows: &mut Rows) -> Result<usize, String> {
        let binary = self
            .binary
            .iter()
            .any(|f| protocol::topic::filter::matches(f, &r.topic));
        if !m.features.inputs().iter().any(|t| t.image.is_some()) {
            return parse_message(&r.payload, binary, &m.features, &self.limits, rows);
        }
        let (m, payload, limits) = (m.clone(), r.payload.clone(), self.limits);
        let parsed = tokio::task::spawn_blocking(move || {
            let mut own = Rows::default();
            parse_message(&payload, binary, &m.features, &limits, &mut own).map(|n| (n, own))
        })
        .await
        .map_err(|e| format!("the reading's parser failed: {e}"))?;
        let (n, own) = parsed?;
        rows.values.extend(own.values);
        rows.ids.extend(own.ids);
        Ok(n)
    }

    /// Close the open drift window (on time, on schedule, at shutdown) and hand its records
    /// to the outbox.
    async fn close_window(&mut self, why: &str) {
        let now = now_ms();
        let mut made = Made::default();
        if why == "time" && self.watch.tracker.as_ref().and_then(|t| t.due(now)).is_none() {
            return;
        }
        self.watch.close(now, why, &mut made);
        self.metrics.drift_alerts.add(made.alerts);
        if made.records.is_empty() && made.meta.is_empty() && made.losses.is_empty() {
            return;
        }
        let append = Append {
            records: made.records,
            losses: made.losses,
            meta: made.meta,
            ..Default::default()
        };
        let bytes = append.bytes();
        if !self.outbox.send(append, bytes).await {
            warn!("outbox task is gone; drift window not buffered");
        }
    }

    /// Run the batch's rows, `max_batch` at a time; returns the predictions as records. When a
    /// batch fails, its rows are run one at a time, and only the rows that fail alone are
    /// counted as failed.
    async fn infer(
        &mut self,
        model: Arc<ActiveModel>,
        batch: &mut Batch,
        failures: &mut Reports,
        made: &mut Made,
        mut keep: Option<&mut Vec<Result<Outputs, String>>>,
    ) -> Vec<Outgoing> {
        let n_features = model.features.len();
        let rows = std::mem::take(&mut batch.rows);
        let values = Arc::new(rows.values);
        let mut out = Vec::with_capacity(rows.ids.len());
        let mut row = 0usize;
        let mut sources = batch
            .sources
            .iter()
            .flat_map(|(t, k)| std::iter::repeat_n(t.clone(), *k));
        let model_ref = model.model_ref();
        // Rows below this run one at a time: their batch failed as a whole.
        let mut one_by_one_until = 0usize;
        let per_call = self.rows_per_call(&model);
        let tabular = model.features.inputs().is_empty();
        while row < rows.ids.len() {
            let size = if row < one_by_one_until { 1 } else { per_call };
            let end = (row + size).min(rows.ids.len());
            let (m, v) = (model.clone(), values.clone());
            let (a, b) = (row * n_features, end * n_features);
            let result = tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let r = m.engine.run_flat(&v[a..b]);
                let took = t.elapsed();
                if let Ok(o) = &r {
                    m.trial.ran(o, took);
                }
                (r, took)
            })
            .await
            .map(|(r, took)| {
                if r.is_ok() {
                    self.latency.record(took, (end - row) as u64);
                    self.metrics.inference_seconds.observe(took);
                }
                r
            });
            let outputs = match result {
                Ok(Ok(o)) => o,
                Ok(Err(_)) | Err(_) if end - row > 1 => {
                    // One row the model cannot run fails its whole batch: run these rows one
                    // at a time, so that only the rows it cannot run are lost.
                    one_by_one_until = end;
                    continue;
                }
                failed => {
                    let message = match failed {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => format!("inference thread: {e}"),
                        Ok(Ok(_)) => unreachable!("matched above"),
                    };
                    let n = (end - row) as u64;
                    if let Some(k) = keep.as_deref_mut() {
                        k.push(Err(format!("inference failed: {message}")));
                    }
                    self.metrics.inference_failed.add(n);
                    model.trial.failed(n);
                    self.metrics.set_last_failure(now_ms(), &message);
                    push_loss(
                        &mut batch.losses,
                        protocol::streams::READINGS,
                        cause::INFERENCE_FAILED,
                        n,
                    );
                    // Logged and sent as an event at once, then at most once a minute with
                    // the count since: a model failing every reading does not flood either.
                    if let Some(rows) = failures.due(n) {
                        let model = format!("{} v{}", model_ref.name, model_ref.version);
                        error!(rows, model = %model, error = %message, "inference failed");
                        let e = event(
                            Level::Error,
                            "inference_failed",
                            format!("{model}: inference failed for {rows} row(s); last: {message}"),
                        );
                        out.push(Outgoing {
                            record: NewRecord {
                                stream: protocol::streams::EVENTS,
                                ts_ms: e.ts_ms,
                                data: serde_json::to_string(&e).expect("an event serializes"),
                            },
                            live: true,
                        });
                    }
                    for _ in row..end {
                        sources.next();
                    }
                    row = end;
                    continue;
                }
            };
            let ts_ms = now_ms();
            let row_sources: Vec<Arc<str>> = (row..end)
                .map(|_| sources.next().expect("one source per row"))
                .collect();
            let ran = Ran {
                model: &model,
                model_ref: &model_ref,
                values: &values[a..b],
                outputs: &outputs,
                sources: &row_sources,
                ids: &rows.ids[row..end],
                ts_ms,
            };
            self.watch.rows(&ran, made);
            for (i, (id, source)) in rows.ids[row..end].iter().zip(&row_sources).enumerate() {
                // Only a tensor model's outputs are cut: a tabular one's keep their 1.6 shape.
                let (whole, wide): (Vec<&Column>, Vec<&Column>) = outputs
                    .columns()
                    .iter()
                    .partition(|c| tabular || c.width <= self.max_output_values);
                let pred = Prediction {
                    ts_ms,
                    model: &model_ref,
                    source,
                    reading_id: id.as_deref(),
                    outputs: whole.iter().map(|c| (&*c.name, c.row(i))).collect::<BTreeMap<_, _>>(),
                    top: wide
                        .iter()
                        .map(|c| (&*c.name, protocol::messages::top_k(c.row(i), self.top_k)))
                        .collect(),
                };
                out.push(Outgoing {
                    record: NewRecord {
                        stream: protocol::streams::PREDICTIONS,
                        ts_ms,
                        data: serde_json::to_string(&pred).expect("a prediction serializes"),
                    },
                    live: self.live,
                });
            }
            if let Some(k) = keep.as_deref_mut() {
                k.push(Ok(outputs));
            }
            row = end;
        }
        out
    }
}

/// The next request of the local API, or never when the API is off.
async fn api_call(rx: &mut Option<mpsc::Receiver<ApiCall>>) -> Option<ApiCall> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// Wait until `d`, or forever when there is none.
async fn at(d: Option<tokio::time::Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The next tick of a schedule, or never when there is none.
async fn tick(rx: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

fn push_loss(losses: &mut Vec<Loss>, stream: &'static str, cause: &'static str, n: u64) {
    match losses.iter_mut().find(|l| l.stream == stream && l.cause == cause) {
        Some(l) => l.count += n,
        None => losses.push(Loss {
            stream,
            cause,
            count: n,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_id: 64,
        max_image_pixels: 1 << 20,
        max_values: 1 << 20,
    };

    fn feats() -> Features {
        Features::new(&["a".into(), "b".into()])
    }

    fn check(input: &str, expected: Result<Vec<f32>, &str>) {
        let mut rows = Rows::default();
        match (parse_reading(input.as_bytes(), &feats(), &LIMITS, &mut rows), expected) {
            (Ok(n), Ok(want)) => {
                assert_eq!(rows.values, want, "{input}");
                assert_eq!(n * 2, want.len(), "{input}");
            }
            (Err(e), Err(want)) => {
                assert!(e.contains(want), "{input}: {e} lacks {want}");
                assert!(
                    rows.is_empty() && rows.values.is_empty(),
                    "{input}: a refused reading adds nothing"
                );
            }
            (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn readings_map_features_by_name() {
        check(r#"{"b": 2, "a": 1, "extra": "x"}"#, Ok(vec![1.0, 2.0]));
        check(
            r#"[{"a": 1, "b": 2}, {"a": 3.5, "b": -4}]"#,
            Ok(vec![1.0, 2.0, 3.5, -4.0]),
        );
        check(
            r#"{"a": 1, "nested": {"deep": [1, {"x": null}]}, "b": 2}"#,
            Ok(vec![1.0, 2.0]),
        );
        check(r#"{"a": 1}"#, Err("\"b\" is missing"));
        check(r#"{"a": 1, "b": "2"}"#, Err("\"b\" is a string, not a number"));
        check(r#"{"a": 1, "b": null}"#, Err("this model does not take missing values"));
        check(r#"{"a": 1, "b": [2]}"#, Err("an array, not a number"));
        check(r#"{"a": 1, "b": 1e300}"#, Err("out of float32 range"));
        check(r#"{"a": 1, "a": 2, "b": 3}"#, Err("\"a\" is given twice"));
        check(r#"[]"#, Err("empty array"));
        check(r#"[1]"#, Err("expected an object of features"));
        check(r#"[{"a":1,"b":2},{"a":1}]"#, Err("\"b\" is missing"));
        check("42", Err("an object or an array of objects"));
        check("{", Err("not JSON"));
        check(r#"{"a":1,"b":2} x"#, Err("not JSON"));
        check(r#"{"\u0061": 5, "b": 6}"#, Ok(vec![5.0, 6.0]));
    }

    fn schema(name: &str, shape: Vec<u64>) -> TensorSchema {
        TensorSchema {
            name: name.into(),
            dtype: "float32".into(),
            shape,
            image: None,
        }
    }

    /// A signal of shape [2, 3] and one more value.
    fn tensor_feats() -> Features {
        Features::tensors(&[schema("sig", vec![2, 3]), schema("k", vec![1])]).expect("inputs")
    }

    fn tensor(input: &str) -> Result<Vec<f32>, String> {
        let mut rows = Rows::default();
        match parse_reading(input.as_bytes(), &tensor_feats(), &LIMITS, &mut rows) {
            Ok(n) => {
                assert_eq!(rows.values.len(), n * 7, "{input}");
                assert_eq!(rows.ids.len(), n, "{input}");
                Ok(rows.values)
            }
            Err(e) => {
                assert!(
                    rows.values.is_empty() && rows.is_empty(),
                    "{input}: a refused reading adds nothing"
                );
                Err(e)
            }
        }
    }

    fn le(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn tensor_readings_take_nested_or_flat_arrays_and_base64() {
        let want = Ok(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0]);
        assert_eq!(tensor(r#"{"k": 9, "sig": [[1,2,3],[4,5,6]]}"#), want);
        assert_eq!(tensor(r#"{"sig": [1,2,3,4,5,6], "k": [9], "id": 3, "x": {}}"#), want);
        assert_eq!(
            tensor(r#"{"sig": {"shape": [1,2,3], "data": [1,2,3,4,5,6]}, "k": {"data": [9]}}"#),
            want
        );
        let b64 = B64.encode(le(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        assert_eq!(
            tensor(&format!(
                r#"{{"sig": {{"b64": "{b64}", "dtype": "float32", "shape": [2,3]}}, "k": 9}}"#
            )),
            want
        );
        let two = tensor(r#"[{"sig": [1,2,3,4,5,6], "k": 9}, {"sig": [0,0,0,0,0,0], "k": 1}]"#).expect("two");
        assert_eq!(two.len(), 14);
        assert_eq!(two[13], 1.0);
        let nan = B64.encode(le(&[1.0, 2.0, 3.0, 4.0, 5.0, f32::NAN]));
        for (input, why) in [
            (r#"{"sig": [1,2,3,4,5], "k": 9}"#.to_string(), "takes 6 values"),
            (r#"{"sig": [1,2,3,4,5,6,7], "k": 9}"#.into(), "more were given"),
            (
                r#"{"sig": [[1,2,3],[4,5]], "k": 9}"#.into(),
                "an axis of 3 entries has 2",
            ),
            (
                r#"{"sig": [[1,2,3],[4,5,6],[7,8,9]], "k": 9}"#.into(),
                "more were given",
            ),
            (
                r#"{"sig": [[1,2,3],4,5,6], "k": 9}"#.into(),
                "a number where an array of 3",
            ),
            (r#"{"sig": [1,2,3,[4],5,6], "k": 9}"#.into(), "mixes numbers and arrays"),
            (r#"{"sig": [[[1],[2],[3]],[4,5,6]], "k": 9}"#.into(), "nested deeper"),
            (r#"{"sig": [1,2,3,4,5,6]}"#.into(), "input \"k\" is missing"),
            (r#"{"sig": [1,2,3,4,5,6], "k": 1, "k": 2}"#.into(), "given twice"),
            (r#"{"sig": [1,2,3,4,5,"6"], "k": 9}"#.into(), "a string, not a number"),
            (r#"{"sig": [1,2,3,4,5,null], "k": 9}"#.into(), "null, not a number"),
            (r#"{"sig": [1,2,3,4,5,1e39], "k": 9}"#.into(), "out of float32 range"),
            (r#"{"sig": 5, "k": 9}"#.into(), "one number was given"),
            (
                r#"{"sig": {"shape": [3,2], "data": [1,2,3,4,5,6]}, "k": 9}"#.into(),
                "is not the input's shape",
            ),
            (r#"{"sig": {"b64": "AAAA"}, "k": 9}"#.into(), "b64 holds 3 bytes"),
            (format!(r#"{{"sig": {{"b64": "{nan}"}}, "k": 9}}"#), "not finite"),
            (
                format!(r#"{{"sig": {{"data": [1,2,3,4,5,6], "b64": "{b64}"}}, "k": 9}}"#),
                "exactly one of data, b64",
            ),
            (
                r#"{"sig": {"shape": [2,3]}, "k": 9}"#.into(),
                "exactly one of data, b64",
            ),
            (
                r#"{"sig": {"data": [1,2,3,4,5,6], "dtype": "int8"}, "k": 9}"#.into(),
                "not float32",
            ),
            (r#"{"sig": {"image": "AAAA"}, "k": 9}"#.into(), "not an image input"),
        ] {
            let e = tensor(&input).expect_err(&input);
            assert!(e.contains(why), "{input}: {e:?} does not say {why:?}");
        }
    }

    #[test]
    fn binary_readings_are_raw_float32_rows() {
        let f = tensor_feats();
        let mut rows = Rows::default();
        let two: Vec<f32> = (0..14).map(|i| i as f32).collect();
        assert_eq!(parse_binary(&le(&two), &f, &LIMITS, &mut rows), Ok(2));
        assert_eq!(rows.values, two);
        assert!(rows.ids.len() == 2 && rows.ids.iter().all(Option::is_none));
        let mut rows = Rows::default();
        let e = parse_binary(&[0u8; 9], &f, &LIMITS, &mut rows).expect_err("not whole rows");
        assert!(
            e.contains("rows of 7 little-endian float32 values (28 bytes each)") && e.contains("9 bytes"),
            "{e}"
        );
        assert!(!e.contains("JPEG"), "{e}");
        let mut bad = two.clone();
        bad[9] = f32::INFINITY;
        let e = parse_binary(&le(&bad), &f, &LIMITS, &mut rows).expect_err("infinite");
        assert!(e.contains("value 2 of row 1 is not finite"), "{e}");
        assert!(rows.values.is_empty() && rows.is_empty());
        // A tabular model's rows, with NaN as a missing value where the model takes them.
        let tab = feats().accepting_missing(true);
        assert_eq!(parse_binary(&le(&[1.0, f32::NAN]), &tab, &LIMITS, &mut rows), Ok(1));
        assert!(parse_binary(&le(&[1.0, f32::NAN]), &feats(), &LIMITS, &mut rows).is_err());
    }

    /// Regression: one message of many small rows (tiny images resized up) could make
    /// gigabytes of input values; a message's rows are now bounded by `max_values`.
    #[test]
    fn a_message_makes_at_most_max_values_input_values() {
        let small = Limits {
            max_values: 14,
            ..LIMITS
        };
        let f = tensor_feats();
        let row = r#"{"sig": [1,2,3,4,5,6], "k": 9}"#;
        let mut rows = Rows::default();
        let two = format!("[{row},{row}]");
        assert_eq!(parse_reading(two.as_bytes(), &f, &small, &mut rows), Ok(2));
        let three = format!("[{row},{row},{row}]");
        let e = parse_reading(three.as_bytes(), &f, &small, &mut rows).expect_err("21 values");
        assert!(e.contains("more than 14 input values"), "{e}");
        assert_eq!(rows.len(), 2, "the refused message added nothing");
        // One row always fits, however wide.
        let tiny = Limits {
            max_values: 3,
            ..LIMITS
        };
        assert_eq!(parse_reading(row.as_bytes(), &f, &tiny, &mut rows), Ok(1));
        assert_eq!(parse_binary(&le(&[0.0; 7]), &f, &tiny, &mut rows), Ok(1));
        let e = parse_binary(&le(&[0.0; 14]), &f, &tiny, &mut rows).expect_err("two binary rows");
        assert!(e.contains("more than 3 input values"), "{e}");
    }

    #[test]
    fn image_readings_are_decoded_as_the_manifest_says() {
        let mut img = schema("img", vec![3, 2, 2]);
        img.image = Some(protocol::bundle::ImageSchema {
            channels: "bgr".into(),
            layout: "nchw".into(),
            mean: vec!["0".into(); 3],
            std: vec!["1".into(); 3],
        });
        let f = Features::tensors(&[img]).expect("image input");
        let mut png = vec![];
        {
            let mut e = png::Encoder::new(&mut png, 2, 2);
            e.set_color(png::ColorType::Rgb);
            e.set_depth(png::BitDepth::Eight);
            let mut w = e.write_header().expect("header");
            w.write_image_data(&[255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])
                .expect("data");
        }
        let mut rows = Rows::default();
        assert_eq!(parse_binary(&png, &f, &LIMITS, &mut rows), Ok(1));
        // Planes B, G, R of the pixels red, green, blue, white.
        let want = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        assert_eq!(rows.values, want);
        let json = format!(r#"{{"id": "cam-1", "img": {{"image": "{}"}}}}"#, B64.encode(&png));
        let mut rows = Rows::default();
        assert_eq!(parse_reading(json.as_bytes(), &f, &LIMITS, &mut rows), Ok(1));
        assert_eq!(rows.values, want);
        // Raw float rows still work on a binary topic; broken and oversized images do not.
        let mut rows = Rows::default();
        assert_eq!(parse_binary(&le(&want), &f, &LIMITS, &mut rows), Ok(1));
        let e = parse_binary(b"\xff\xd8\xff\xe0 broken", &f, &LIMITS, &mut rows).expect_err("broken");
        assert!(e.contains("JPEG"), "{e}");
        let small = Limits {
            max_image_pixels: 3,
            ..LIMITS
        };
        let e = parse_binary(&png, &f, &small, &mut rows).expect_err("4 pixels");
        assert!(e.contains("max_image_pixels"), "{e}");
        assert_eq!(rows.values.len(), 12, "refused readings add nothing");
    }

    #[test]
    fn repeated_troubles_are_reported_at_once_then_counted() {
        let mut r = Reports::default();
        assert_eq!(r.due(3), Some(3), "the first is reported at once");
        assert_eq!(r.due(2), None);
        assert_eq!(r.due(1), None);
        assert_eq!(r.since, 3, "counted until the next report");
        r.last = Some(Instant::now() - Reports::EVERY);
        assert_eq!(r.due(1), Some(4), "a minute on: the count since");
    }

    #[test]
    fn null_is_a_missing_value_for_a_model_that_takes_them() {
        let f = feats().accepting_missing(true);
        let mut rows = Rows::default();
        parse_reading(br#"[{"a":null,"b":2},{"a":1,"b":3}]"#, &f, &LIMITS, &mut rows).expect("parses");
        assert!(rows.values[0].is_nan());
        assert_eq!(rows.values[1..], [2.0, 1.0, 3.0]);
        let e = parse_reading(br#"{"a":"x","b":2}"#, &f, &LIMITS, &mut rows).expect_err("still a number or null");
        assert!(e.contains("a string"), "{e}");
    }

    #[test]
    fn reading_ids_are_kept_and_cut() {
        let mut rows = Rows::default();
        parse_reading(br#"{"a":1,"b":2,"id":"r-17"}"#, &feats(), &LIMITS, &mut rows).expect("parses");
        assert_eq!(rows.ids[0].as_ref().map(|r| r.get()), Some(r#""r-17""#));
        parse_reading(
            br#"{"a":1,"b":2,"id":{"line":3,"n":[1,2]}}"#,
            &feats(),
            &LIMITS,
            &mut rows,
        )
        .expect("parses");
        assert_eq!(rows.ids[1].as_ref().map(|r| r.get()), Some(r#"{"line":3,"n":[1,2]}"#));
        parse_reading(br#"{"a":1,"b":2}"#, &feats(), &LIMITS, &mut rows).expect("parses");
        assert!(rows.ids[2].is_none());
        // Regression: an echoed id of any size made a record larger than a packet.
        let long = format!(r#"{{"a":1,"b":2,"id":"{}"}}"#, "x".repeat(100_000));
        parse_reading(long.as_bytes(), &feats(), &LIMITS, &mut rows).expect("parses");
        let id = rows.ids[3].as_ref().expect("id").get();
        assert!(id.len() <= 64, "{} bytes", id.len());
        assert!(id.contains("bytes)"), "{id}");
        let s: String = serde_json::from_str(id).expect("a JSON string");
        assert!(s.starts_with("\"xxx"), "{s}");
    }

    proptest::proptest! {
        /// The reading parser never panics, and a refused reading adds nothing.
        #[test]
        fn arbitrary_readings_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut rows = Rows::default();
            if parse_reading(&bytes, &feats(), &LIMITS, &mut rows).is_err() {
                proptest::prop_assert!(rows.is_empty() && rows.values.is_empty());
            } else {
                proptest::prop_assert_eq!(rows.values.len(), rows.len() * 2);
            }
        }

        #[test]
        fn json_shaped_readings_never_panic(s in r#"[\[\]{}":,a-b0-9 .e+-]{0,200}"#) {
            let mut rows = Rows::default();
            let _ = parse_reading(s.as_bytes(), &feats(), &LIMITS, &mut rows);
        }
    }

    /// Regression: readings were parsed whole into `serde_json::Value`; members the model does
    /// not use are now skipped. A reading padded with a large array still parses to its row.
    #[test]
    fn padding_is_skipped() {
        let pad = format!(r#"{{"pad":[{}],"a":1,"b":2}}"#, vec!["[0,0,0,0]"; 200_000].join(","));
        let mut rows = Rows::default();
        assert_eq!(parse_reading(pad.as_bytes(), &feats(), &LIMITS, &mut rows), Ok(1));
        assert_eq!(rows.values, vec![1.0, 2.0]);
    }
}
