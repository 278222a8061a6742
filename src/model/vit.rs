// SPDX-License-Identifier: MIT OR Apache-2.0
//! DINOv2 Vision Transformers as timm's `vit_small_patch14_dinov2`,
//! `vit_base_patch14_dinov2` and `vit_large_patch14_dinov2` (timm 1.0.31,
//! `timm/models/vision_transformer.py`), run the way anomalib 2.7.0's PatchFlow runs them.
//!
//! The facts ported from timm and anomalib:
//!
//! - Patch embedding: a 14x14 convolution with stride 14 and bias, 3 to `embed_dim`
//!   channels. The input sides must be multiples of 14, which PatchFlow ensures by
//!   flooring its sizes.
//! - One class token, no register tokens. The position embedding has one entry for the
//!   class token and a 37x37 grid for the patches (the 518x518 training size). It is
//!   added after the class token is prepended.
//! - anomalib creates the model with `dynamic_img_size=True`, so the patch grid of the
//!   position embedding is resampled to each input's grid with bicubic interpolation.
//!   anomalib forces `antialias=False`, which makes it torch's plain
//!   `F.interpolate(mode="bicubic", align_corners=False)`: Keys' cubic kernel with
//!   `A = -0.75`, four taps per axis, tap indices clamped to the grid. The class-token
//!   entry is kept as it is.
//! - Block: `x + ls1 * attn(norm1(x))`, then `x + ls2 * mlp(norm2(x))`. Every LayerNorm
//!   has eps 1e-6. Attention is multi-head softmax attention with a fused `qkv` linear
//!   layer (with bias), scale `head_dim^-0.5` and an output projection `proj`. The MLP is
//!   `fc1`, exact (erf) GELU, `fc2`, with a hidden width of 4 `embed_dim`. LayerScale
//!   (`ls1.gamma`, `ls2.gamma`) multiplies each channel.
//! - anomalib's feature extractor calls `forward_intermediates` on blocks
//!   `[0, depth / 2, depth - 1]` with `norm=True`: the final LayerNorm `norm` is applied
//!   to each of those block outputs. The class token is dropped and the patch tokens
//!   are laid out as (B, embed_dim, H / 14, W / 14).
//!
//! The giant variant is not supported because its MLP is a SwiGLU, not `fc1`/GELU/`fc2`.
//! Tensor names follow timm's state dict (`cls_token`, `pos_embed`,
//! `patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, `norm.bias`).

use candle_core::{D, Result as CandleResult, Tensor};

use super::weights::{ModelError, Weights};

/// Side of a square patch, in pixels, and so the stride of every feature map.
pub const PATCH_SIZE: usize = 14;

/// Side of the patch grid that the position embedding stores: 518 / 14.
pub const POS_EMBED_GRID: usize = 37;

/// LayerNorm eps of every DINOv2 norm layer in timm.
const LAYER_NORM_EPS: f64 = 1e-6;

/// Hidden width of the MLP relative to `embed_dim`.
const MLP_RATIO: usize = 4;

/// The `A` parameter of the cubic convolution kernel that torch's bicubic
/// interpolation uses.
const CUBIC_A: f64 = -0.75;

/// Architecture of one DINOv2 ViT variant.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub name: String,
    /// Token width.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    pub num_heads: usize,
}

impl VitConfig {
    /// Builds the architecture for a timm model name such as `vit_small_patch14_dinov2`.
    pub fn from_name(name: &str) -> Option<Self> {
        let (embed_dim, depth, num_heads) = match name {
            "vit_small_patch14_dinov2" => (384, 12, 6),
            "vit_base_patch14_dinov2" => (768, 12, 12),
            "vit_large_patch14_dinov2" => (1024, 24, 16),
            _ => return None,
        };
        Some(Self {
            name: name.to_string(),
            embed_dim,
            depth,
            num_heads,
        })
    }

    /// Names accepted by [`VitConfig::from_name`].
    pub fn supported_names() -> Vec<String> {
        [
            "vit_small_patch14_dinov2",
            "vit_base_patch14_dinov2",
            "vit_large_patch14_dinov2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Indices of the blocks whose outputs are the feature maps: the first, the middle
    /// and the last, as anomalib's PatchFlow picks them.
    pub fn feature_blocks(&self) -> [usize; 3] {
        [0, self.depth / 2, self.depth - 1]
    }

    /// Channels of the three feature maps.
    pub fn stage_channels(&self) -> Vec<usize> {
        vec![self.embed_dim; 3]
    }

    /// Lists the names and shapes of the tensors that [`Vit::load`] reads, in timm's
    /// naming and order. A DINOv2 state dict in timm has no classifier.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.embed_dim;
        let hidden = MLP_RATIO * c;
        let tokens = 1 + POS_EMBED_GRID * POS_EMBED_GRID;
        let mut out = vec![
            ("cls_token".to_string(), vec![1, 1, c]),
            ("pos_embed".to_string(), vec![1, tokens, c]),
            (
                "patch_embed.proj.weight".to_string(),
                vec![c, 3, PATCH_SIZE, PATCH_SIZE],
            ),
            ("patch_embed.proj.bias".to_string(), vec![c]),
        ];
        for i in 0..self.depth {
            let block = [
                ("norm1.weight", vec![c]),
                ("norm1.bias", vec![c]),
                ("attn.qkv.weight", vec![3 * c, c]),
                ("attn.qkv.bias", vec![3 * c]),
                ("attn.proj.weight", vec![c, c]),
                ("attn.proj.bias", vec![c]),
                ("ls1.gamma", vec![c]),
                ("norm2.weight", vec![c]),
                ("norm2.bias", vec![c]),
                ("mlp.fc1.weight", vec![hidden, c]),
                ("mlp.fc1.bias", vec![hidden]),
                ("mlp.fc2.weight", vec![c, hidden]),
                ("mlp.fc2.bias", vec![c]),
                ("ls2.gamma", vec![c]),
            ];
            out.extend(
                block
                    .into_iter()
                    .map(|(name, shape)| (format!("blocks.{i}.{name}"), shape)),
            );
        }
        out.push(("norm.weight".to_string(), vec![c]));
        out.push(("norm.bias".to_string(), vec![c]));
        out
    }
}

/// Keys' cubic convolution kernel for `|x| <= 1`.
fn cubic_near(x: f64) -> f64 {
    ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
}

/// Keys' cubic convolution kernel for `1 < |x| < 2`.
fn cubic_far(x: f64) -> f64 {
    ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A
}

/// Dense `output x input` matrix (row-major) of one axis of torch's bicubic
/// interpolation with `align_corners=False` and no antialiasing. Output sample `i` reads
/// the source position `(i + 0.5) * input / output - 0.5`, which is not clamped at zero.
/// Its four taps start one sample before the floor of that position, and taps outside
/// the input are clamped to the first or last sample, so their weights add up there.
pub fn bicubic_matrix(input: usize, output: usize) -> Vec<f32> {
    assert!(
        input > 0 && output > 0,
        "bicubic resize from {input} to {output} samples"
    );
    let scale = input as f64 / output as f64;
    let last = input as i64 - 1;
    let mut m = vec![0f32; output * input];
    for i in 0..output {
        let src = scale * (i as f64 + 0.5) - 0.5;
        let floor = src.floor();
        let t = (src - floor).clamp(0.0, 1.0);
        let weights = [
            cubic_far(t + 1.0),
            cubic_near(t),
            cubic_near(1.0 - t),
            cubic_far(2.0 - t),
        ];
        for (k, w) in weights.iter().enumerate() {
            let j = (floor as i64 - 1 + k as i64).clamp(0, last) as usize;
            m[i * input + j] += *w as f32;
        }
    }
    m
}

/// LayerNorm over the last axis, with the variance of the centred values.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(w: &Weights, channels: usize) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w.get("weight", &[channels])?,
            bias: w.get("bias", &[channels])?,
        })
    }

    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + LAYER_NORM_EPS)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// A linear layer with bias on the last axis of a (B, N, in) tensor.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn load(w: &Weights, out_features: usize, in_features: usize) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w.get("weight", &[out_features, in_features])?,
            bias: w.get("bias", &[out_features])?,
        })
    }

    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        let (b, n, c) = x.dims3()?;
        let y = x.reshape((b * n, c))?.matmul(&self.weight.t()?)?;
        y.broadcast_add(&self.bias)?.reshape((b, n, ()))
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Tensor,
    num_heads: usize,
}

impl Block {
    fn load(w: &Weights, cfg: &VitConfig) -> Result<Self, ModelError> {
        let c = cfg.embed_dim;
        Ok(Self {
            norm1: LayerNorm::load(&w.pp("norm1"), c)?,
            qkv: Linear::load(&w.pp("attn.qkv"), 3 * c, c)?,
            proj: Linear::load(&w.pp("attn.proj"), c, c)?,
            ls1: w.get("ls1.gamma", &[c])?,
            norm2: LayerNorm::load(&w.pp("norm2"), c)?,
            fc1: Linear::load(&w.pp("mlp.fc1"), MLP_RATIO * c, c)?,
            fc2: Linear::load(&w.pp("mlp.fc2"), c, MLP_RATIO * c)?,
            ls2: w.get("ls2.gamma", &[c])?,
            num_heads: cfg.num_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> CandleResult<Tensor> {
        let (b, n, c) = x.dims3()?;
        let head_dim = c / self.num_heads;
        // (B, N, 3C) -> (3, B, heads, N, head_dim): the q, k, v split of timm's layout.
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, self.num_heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let logits = (q.matmul(&k.t()?)? * scale)?;
        let weights = candle_nn::ops::softmax_last_dim(&logits)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        let attn = self.attention(&self.norm1.forward(x)?)?;
        let x = (x + attn.broadcast_mul(&self.ls1)?)?;
        let hidden = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        let mlp = self.fc2.forward(&hidden)?;
        x + mlp.broadcast_mul(&self.ls2)?
    }
}

/// A DINOv2 ViT feature extractor.
#[derive(Debug, Clone)]
pub struct Vit {
    config: VitConfig,
    /// Patch embedding as a matrix (embed_dim, 3 * 14 * 14) over flattened patches.
    patch_weight: Tensor,
    patch_bias: Tensor,
    /// Class token plus its position embedding, (1, 1, embed_dim).
    cls_with_pos: Tensor,
    /// Patch position embeddings as a (37, 37, embed_dim) grid.
    pos_grid: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl Vit {
    /// Loads the network from timm-named weights.
    pub fn load(w: &Weights, config: &VitConfig) -> Result<Self, ModelError> {
        let c = config.embed_dim;
        let patch_len = 3 * PATCH_SIZE * PATCH_SIZE;
        let patch_weight = w
            .get("patch_embed.proj.weight", &[c, 3, PATCH_SIZE, PATCH_SIZE])?
            .reshape((c, patch_len))?;
        let patch_bias = w.get("patch_embed.proj.bias", &[c])?;
        let cls_token = w.get("cls_token", &[1, 1, c])?;
        let tokens = 1 + POS_EMBED_GRID * POS_EMBED_GRID;
        let pos_embed = w.get("pos_embed", &[1, tokens, c])?;
        let cls_with_pos = (cls_token + pos_embed.narrow(1, 0, 1)?)?;
        let pos_grid =
            pos_embed
                .narrow(1, 1, tokens - 1)?
                .reshape((POS_EMBED_GRID, POS_EMBED_GRID, c))?;
        let blocks = (0..config.depth)
            .map(|i| Block::load(&w.pp(format!("blocks.{i}")), config))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config: config.clone(),
            patch_weight,
            patch_bias,
            cls_with_pos,
            pos_grid,
            blocks,
            norm: LayerNorm::load(&w.pp("norm"), c)?,
        })
    }

    /// Returns the architecture this network was built with.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Patch position embeddings resampled to a (rows, cols) grid, as (rows * cols, C).
    fn position_embedding(&self, (rows, cols): (usize, usize)) -> CandleResult<Tensor> {
        let c = self.config.embed_dim;
        if (rows, cols) == (POS_EMBED_GRID, POS_EMBED_GRID) {
            return self.pos_grid.reshape((rows * cols, c));
        }
        let dev = self.pos_grid.device();
        let dtype = self.pos_grid.dtype();
        let matrix = |output: usize| -> CandleResult<Tensor> {
            let m = bicubic_matrix(POS_EMBED_GRID, output);
            Tensor::from_vec(m, (output, POS_EMBED_GRID), dev)?.to_dtype(dtype)
        };
        // Rows: (rows, 37) x (37, 37 * C). Columns: (cols, 37) x (37, C) for each row.
        let by_rows = matrix(rows)?
            .matmul(
                &self
                    .pos_grid
                    .reshape((POS_EMBED_GRID, POS_EMBED_GRID * c))?,
            )?
            .reshape((rows, POS_EMBED_GRID, c))?;
        matrix(cols)?
            .broadcast_matmul(&by_rows)?
            .reshape((rows * cols, c))
    }

    /// Embeds the 14x14 patches of a (B, 3, H, W) input: (B, H/14 * W/14, C).
    fn patch_embed(&self, x: &Tensor) -> CandleResult<Tensor> {
        let (b, ch, h, w) = x.dims4()?;
        let (rows, cols) = (h / PATCH_SIZE, w / PATCH_SIZE);
        // (B, 3, rows, 14, cols, 14) -> (B, rows, cols, 3, 14, 14): one row per patch,
        // flattened in the order of the convolution weight.
        let patches = x
            .reshape((b, ch, rows, PATCH_SIZE, cols, PATCH_SIZE))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * rows * cols, ch * PATCH_SIZE * PATCH_SIZE))?;
        let y = patches
            .matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;
        y.reshape((b, rows * cols, self.config.embed_dim))
    }

    /// Returns the final-norm outputs of `taps` (block indices, ascending) for a
    /// normalised input whose sides are multiples of 14, each as (B, C, H/14, W/14).
    pub fn features(&self, x: &Tensor, taps: &[usize]) -> CandleResult<Vec<Tensor>> {
        let (b, _, h, w) = x.dims4()?;
        if h % PATCH_SIZE != 0 || w % PATCH_SIZE != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "ViT input {h}x{w} is not a positive multiple of the {PATCH_SIZE}-pixel patch size"
            );
        }
        let (rows, cols) = (h / PATCH_SIZE, w / PATCH_SIZE);
        let c = self.config.embed_dim;
        let patches = self
            .patch_embed(x)?
            .broadcast_add(&self.position_embedding((rows, cols))?)?;
        let cls = self.cls_with_pos.broadcast_as((b, 1, c))?;
        let mut tokens = Tensor::cat(&[&cls, &patches], 1)?;
        let last = taps.iter().copied().max().unwrap_or(0);
        let mut out = Vec::with_capacity(taps.len());
        for (i, block) in self.blocks.iter().enumerate().take(last + 1) {
            tokens = block.forward(&tokens)?;
            if taps.contains(&i) {
                let normed = self.norm.forward(&tokens)?;
                let map = normed
                    .narrow(1, 1, rows * cols)?
                    .reshape((b, rows, cols, c))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?;
                out.push(map);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_matrix_rows_sum_to_one() {
        for (input, output) in [(37, 3), (37, 4), (37, 54), (5, 2)] {
            let m = bicubic_matrix(input, output);
            for row in m.chunks_exact(input) {
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-6, "{input}->{output}: row sum {sum}");
            }
        }
    }

    #[test]
    fn bicubic_matrix_same_size_is_identity() {
        let m = bicubic_matrix(6, 6);
        for (i, row) in m.chunks_exact(6).enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert_eq!(*v, if i == j { 1.0 } else { 0.0 }, "entry ({i}, {j})");
            }
        }
    }

    #[test]
    fn bicubic_matches_torch() {
        // torch 2.15: F.interpolate(torch.arange(5.).pow(2).view(1, 1, 1, 5), size=(1, 2),
        // mode="bicubic", align_corners=False) returns [0.45703125, 11.11328125].
        let input = [0f32, 1.0, 4.0, 9.0, 16.0];
        let m = bicubic_matrix(5, 2);
        let out: Vec<f32> = m
            .chunks_exact(5)
            .map(|row| row.iter().zip(&input).map(|(w, x)| w * x).sum())
            .collect();
        assert!((out[0] - 0.457_031_25).abs() < 1e-6, "{out:?}");
        assert!((out[1] - 11.113_281).abs() < 1e-5, "{out:?}");
    }

    #[test]
    fn small_matches_timm_layout() {
        let cfg = VitConfig::from_name("vit_small_patch14_dinov2").unwrap();
        assert_eq!(cfg.feature_blocks(), [0, 6, 11]);
        // timm 1.0.31's vit_small_patch14_dinov2 state dict has 174 tensors and
        // 22,056,192 parameters.
        let shapes = cfg.tensor_shapes();
        assert_eq!(shapes.len(), 174);
        let params: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 22_056_192);
    }
}
