//! `FlatParams`: every trainable parameter of a model in one contiguous f32
//! vector, in a canonical order (sorted by variable name), with a fingerprint
//! of the architecture.
//!
//! Mixing math, the wire and checkpoints all speak this type, so two nodes
//! agree on what element `k` means as long as their fingerprints agree, and
//! nodes with different fingerprints never mix.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Why parameters could not be read from or written to a model.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error(
        "model fingerprint mismatch: expected {expected}, got {got} (different architecture or sizes)"
    )]
    FingerprintMismatch { expected: Fingerprint, got: Fingerprint },
    #[error("parameter vector has {got} values but the model has {expected}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("variable {name} is {kind:?}; only f32 parameters are supported")]
    UnsupportedKind { name: String, kind: Kind },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A short hash of an architecture: its name and every variable's name and
/// shape. Equal fingerprints mean equal layouts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(pub String);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One variable's place in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: usize,
    pub len: usize,
}

/// The canonical order and shapes of a model's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    pub arch: String,
    pub entries: Vec<ParamEntry>,
    pub total: usize,
    pub fingerprint: Fingerprint,
}

impl ParamLayout {
    /// The model's layers as ranges of the flat vector, in layout order:
    /// consecutive variables of the same module (the name up to its last
    /// `.`, as `fc1` of `fc1.weight` and `fc1.bias`) form one layer.
    pub fn layers(&self) -> Vec<std::ops::Range<usize>> {
        let module = |name: &str| name.rsplit_once('.').map_or(name, |(m, _)| m).to_string();
        let mut out: Vec<(String, std::ops::Range<usize>)> = Vec::new();
        for e in &self.entries {
            let m = module(&e.name);
            match out.last_mut() {
                Some((last, range)) if *last == m && range.end == e.offset => {
                    range.end = e.offset + e.len
                }
                _ => out.push((m, e.offset..e.offset + e.len)),
            }
        }
        out.into_iter().map(|(_, r)| r).collect()
    }

    /// The layout of every variable in `vs`, sorted by name.
    pub fn of(arch: &str, vs: &VarStore) -> ParamLayout {
        let mut named: Vec<(String, Vec<i64>)> =
            vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hasher = Sha256::new();
        hasher.update(arch.as_bytes());
        let mut entries = Vec::with_capacity(named.len());
        let mut offset = 0usize;
        for (name, shape) in named {
            hasher.update(format!("\n{name}:{shape:?}").as_bytes());
            let len = shape.iter().product::<i64>().max(0) as usize;
            entries.push(ParamEntry { name, shape, offset, len });
            offset += len;
        }
        let digest = hasher.finalize();
        let fingerprint = Fingerprint(digest[..8].iter().map(|b| format!("{b:02x}")).collect());
        ParamLayout { arch: arch.to_string(), entries, total: offset, fingerprint }
    }
}

/// A model's trainable parameters as one f32 vector in layout order.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatParams {
    pub layout: Arc<ParamLayout>,
    pub values: Vec<f32>,
}

impl FlatParams {
    /// Copies the current values of every variable in `vs`.
    pub fn from_var_store(
        layout: Arc<ParamLayout>,
        vs: &VarStore,
    ) -> Result<FlatParams, ParamsError> {
        let vars = vs.variables();
        let mut values = vec![0f32; layout.total];
        for e in &layout.entries {
            let t = vars.get(&e.name).ok_or_else(|| ParamsError::FingerprintMismatch {
                expected: layout.fingerprint.clone(),
                got: ParamLayout::of(&layout.arch, vs).fingerprint,
            })?;
            if t.kind() != Kind::Float {
                return Err(ParamsError::UnsupportedKind { name: e.name.clone(), kind: t.kind() });
            }
            let cpu = t.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
            cpu.f_copy_data(&mut values[e.offset..e.offset + e.len], e.len)?;
        }
        Ok(FlatParams { layout, values })
    }

    /// Writes these values into the variables of `vs`, which must have the
    /// same layout.
    pub fn write_to(&self, vs: &VarStore) -> Result<(), ParamsError> {
        let found = ParamLayout::of(&self.layout.arch, vs);
        if found.fingerprint != self.layout.fingerprint {
            return Err(ParamsError::FingerprintMismatch {
                expected: found.fingerprint,
                got: self.layout.fingerprint.clone(),
            });
        }
        if self.values.len() != self.layout.total {
            return Err(ParamsError::LengthMismatch {
                expected: self.layout.total,
                got: self.values.len(),
            });
        }
        let vars = vs.variables();
        tch::no_grad(|| -> Result<(), ParamsError> {
            for e in &self.layout.entries {
                let Some(var) = vars.get(&e.name) else { continue };
                let src = Tensor::from_slice(&self.values[e.offset..e.offset + e.len])
                    .f_reshape(&e.shape)?
                    .f_to_device(var.device())?;
                let mut var = var.shallow_clone();
                var.f_copy_(&src)?;
            }
            Ok(())
        })
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    fn tiny(vs: &VarStore) {
        let root = vs.root();
        let _ = nn::linear(&root / "b", 3, 2, Default::default());
        let _ = nn::linear(&root / "a", 2, 4, Default::default());
    }

    #[test]
    fn layout_is_name_sorted_and_contiguous() {
        let vs = VarStore::new(tch::Device::Cpu);
        tiny(&vs);
        let l = ParamLayout::of("tiny", &vs);
        let names: Vec<&str> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a.bias", "a.weight", "b.bias", "b.weight"]);
        assert_eq!(l.total, 4 + 8 + 2 + 6);
        assert_eq!(l.entries[2].offset, 12);
        // a.bias + a.weight, then b.bias + b.weight.
        assert_eq!(l.layers(), [0..12, 12..20]);
    }

    #[test]
    fn round_trip_is_exact() {
        let vs = VarStore::new(tch::Device::Cpu);
        tiny(&vs);
        let layout = Arc::new(ParamLayout::of("tiny", &vs));
        let mut p = FlatParams::from_var_store(layout.clone(), &vs).unwrap();
        // Values that would lose bits through any conversion.
        for (i, v) in p.values.iter_mut().enumerate() {
            *v =
                f32::from_bits(0x3f80_0001 + i as u32 * 7919) * if i % 2 == 0 { -1.0 } else { 1.0 };
        }
        p.write_to(&vs).unwrap();
        let back = FlatParams::from_var_store(layout, &vs).unwrap();
        let a: Vec<u32> = p.values.iter().map(|v| v.to_bits()).collect();
        let b: Vec<u32> = back.values.iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn fingerprint_tracks_shapes_and_arch() {
        let a = VarStore::new(tch::Device::Cpu);
        tiny(&a);
        let b = VarStore::new(tch::Device::Cpu);
        let _ = nn::linear(&b.root() / "a", 2, 5, Default::default());
        let _ = nn::linear(&b.root() / "b", 3, 2, Default::default());
        let fa = ParamLayout::of("tiny", &a).fingerprint;
        assert_ne!(fa, ParamLayout::of("tiny", &b).fingerprint);
        assert_ne!(fa, ParamLayout::of("other", &a).fingerprint);
        assert_eq!(fa, ParamLayout::of("tiny", &a).fingerprint);
        let p = FlatParams::from_var_store(Arc::new(ParamLayout::of("tiny", &a)), &a).unwrap();
        assert!(matches!(p.write_to(&b), Err(ParamsError::FingerprintMismatch { .. })));
    }
}
