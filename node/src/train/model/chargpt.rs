//! A small GPT over characters: token and position embeddings, N pre-norm
//! blocks of causal self-attention and a GELU MLP, a final norm and a head
//! that is either its own matrix or the token embedding (tied).
//!
//! No dropout: training stays a pure function of the seed and the batches,
//! which is what makes checkpoint/resume bit-exact.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::{ModelError, linear};

/// Sizes of a `chargpt` model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CharGptSpec {
    pub layers: usize,
    pub heads: usize,
    /// Embedding width; a multiple of `heads`.
    pub dim: usize,
    /// Longest sequence the model sees (position embeddings).
    pub context: usize,
    /// Use the token embedding as the output head.
    pub tie_embeddings: bool,
}

#[derive(Debug)]
struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::LayerNorm,
    fc: nn::Linear,
    out: nn::Linear,
    heads: i64,
}

impl Block {
    fn new(p: &nn::Path, dim: i64, heads: i64) -> Block {
        let ln = |name: &str| nn::layer_norm(p / name, vec![dim], Default::default());
        Block {
            ln1: ln("ln1"),
            qkv: linear(p, "attn_qkv", dim, 3 * dim, true),
            proj: linear(p, "attn_proj", dim, dim, true),
            ln2: ln("ln2"),
            fc: linear(p, "mlp_fc", dim, 4 * dim, true),
            out: linear(p, "mlp_out", 4 * dim, dim, true),
            heads,
        }
    }

    fn attention(&self, x: &Tensor) -> Tensor {
        let (b, t, d) = x.size3().unwrap_or((1, 1, 1));
        let hd = d / self.heads;
        let split = |z: Tensor| z.reshape([b, t, self.heads, hd]).transpose(1, 2);
        let qkv = self.qkv.forward(x).split(d, 2);
        let [q, k, v] = <[Tensor; 3]>::try_from(qkv).unwrap_or_else(|_| unreachable!());
        let y = Tensor::scaled_dot_product_attention(
            &split(q),
            &split(k),
            &split(v),
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        self.proj.forward(&y.transpose(1, 2).reshape([b, t, d]))
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attention(&self.ln1.forward(x));
        let h = self.fc.forward(&self.ln2.forward(&x)).gelu("none");
        &x + self.out.forward(&h)
    }
}

#[derive(Debug)]
pub(super) struct CharGpt {
    tok: nn::Embedding,
    pos: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    head: Option<nn::Linear>,
}

impl CharGpt {
    pub(super) fn new(p: &nn::Path, s: &CharGptSpec, vocab: usize) -> Result<CharGpt, ModelError> {
        for (flag, v) in [
            ("--layers", s.layers),
            ("--heads", s.heads),
            ("--dim", s.dim),
            ("--context", s.context),
        ] {
            if v == 0 {
                return Err(ModelError::BadSize(format!("{flag} must be >= 1 (got 0)")));
            }
        }
        if !s.dim.is_multiple_of(s.heads) {
            return Err(ModelError::BadSize(format!(
                "--dim must be a multiple of --heads (got dim {} with {} heads)",
                s.dim, s.heads
            )));
        }
        let (d, v) = (s.dim as i64, vocab as i64);
        let emb = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
            ..Default::default()
        };
        Ok(CharGpt {
            tok: nn::embedding(p / "tok_emb", v, d, emb),
            pos: nn::embedding(p / "pos_emb", s.context as i64, d, emb),
            blocks: (0..s.layers)
                .map(|i| Block::new(&(p / format!("h{i:02}")), d, s.heads as i64))
                .collect(),
            ln_f: nn::layer_norm(p / "ln_f", vec![d], Default::default()),
            head: (!s.tie_embeddings).then(|| linear(p, "head", d, v, false)),
        })
    }
}

impl Module for CharGpt {
    fn forward(&self, tokens: &Tensor) -> Tensor {
        let t = tokens.size().get(1).copied().unwrap_or(1);
        let positions = Tensor::arange(t, (Kind::Int64, tokens.device()));
        let mut x = self.tok.forward(tokens) + self.pos.forward(&positions);
        for b in &self.blocks {
            x = b.forward(&x);
        }
        let x = self.ln_f.forward(&x);
        match &self.head {
            Some(h) => h.forward(&x),
            None => x.matmul(&self.tok.ws.tr()),
        }
    }
}
