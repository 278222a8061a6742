// SPDX-License-Identifier: MIT OR Apache-2.0
//! Deterministic weights for parity tests and benchmarks.
//!
//! [`synthetic_tensors`] fills every tensor that [`super::PatchFlow::new`] reads for a
//! [`ModelConfig`] with values that depend only on the tensor's name and shape.
//! `scripts/reference/make_fixtures.py` implements the same generator in Python and
//! loads its values into anomalib's `PatchflowModel`, so both models have the same
//! weights without storing any.
//!
//! For a tensor named `name` (model-file naming, e.g. `backbone.blocks.1.0.conv_pw.weight`)
//! with element `i` in row-major order:
//!
//! - `seed = FNV-1a-64(name bytes)`;
//! - `key_i = splitmix64(seed ^ (i * 0x9E3779B97F4A7C15))`, with wrapping arithmetic;
//! - `u_i = (key_i >> 40) / 2^24`, a fraction in [0, 1) that f32 holds exactly;
//! - `value_i = (lo + (hi - lo) * u_i) as f32`, computed in f64.
//!
//! `(lo, hi)` comes from [`value_range`]. `w_perm` is the permutation that sorts the
//! keys `key_0 .. key_{C-1}` of its own name (see [`synthetic_permutation`]).
//!
//! The ranges keep activations O(1) to O(10) through the Lite and B families, and keep
//! the anomaly map away from both saturation points (-1 and 0). Most backbone
//! convolutions feed an activation, so they use Kaiming-uniform bounds
//! `sqrt(6 / fan_in)`. The inverted-residual projections (`conv_pwl`) keep unit gain,
//! because with Kaiming bounds there too the B0 features grow to about 100. The
//! squeeze-excite gate bias lies in [1, 3], so the gate is near 0.88 instead of
//! halving every block's output.
//!
//! ResNet names (`layer*`, `downsample`) have two rules of their own, because generated
//! running statistics do not normalise anything. With Kaiming bounds everywhere, each
//! residual block adds a branch as large as its input, and the wide_resnet50_2 features
//! reach about 3.5e4 on a 64x64 input. The residual branch's later convolutions
//! (`layer*.conv2`, `layer*.conv3`) use `sqrt(1 / fan_in)` and the projection shortcuts
//! (`downsample.0`) unit gain. That keeps the features of ResNet-18, -34 and the wide
//! ResNet-50 at most about 40 (measured on a 96x64 random input).
//!
//! EfficientNet blocks other than the first of a stage add their branch to the input.
//! The last convolution of that branch (`conv_pwl`, or `conv_pw` in the
//! depthwise-separable stage 0) uses `sqrt(1 / fan_in)`. Without that rule the
//! tf_efficientnet_b5 features, with up to 9 such blocks in a stage, reach about 360 on
//! a 64x48 input and the map saturates at 0. With it they stay below about 6.
//!
//! DINOv2 ViT tensors (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.{i}.*` with
//! `norm1`, `attn`, `ls1`, `norm2`, `mlp` and `ls2`, and `norm`) use the rules above as
//! follows. The class token and the position embedding lie in [-1, 1], so the position
//! embedding is a large part of every token: resampling it bilinearly instead of
//! bicubically changes the ViT-S fixture features by up to 0.9. LayerNorm scales and
//! LayerScale (`gamma`) share the BatchNorm scale range [0.5, 1.5], and LayerNorm biases
//! the bias range. The linear layers that feed no activation (`attn.qkv`, `attn.proj`,
//! `mlp.fc2`) keep unit gain, and `mlp.fc1` (before GELU) and the patch embedding use
//! Kaiming bounds. The ViT features are outputs of the final LayerNorm, so they stay
//! O(1): at most about 5.4 in absolute value on the committed fixtures.
//!
//! On the committed fixtures the map lies between about -0.99 and -0.03.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::flow::permutation_matrix;
use super::weights::ModelError;
use super::{ADAPTOR_PREFIX, BACKBONE_PREFIX, FLOW_PREFIX, ModelConfig, backbone_config};

/// The increment of splitmix64 (2^64 divided by the golden ratio), also used to spread
/// element indices over the seed.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Computes the 64-bit FNV-1a hash of the UTF-8 bytes of `name`.
pub fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Computes one splitmix64 output for state `x`: `x + gamma`, then two
/// xor-shift-multiply rounds and a final xor-shift.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Computes the 64-bit key of element `index` of the tensor whose name hashes to `seed`.
fn element_key(seed: u64, index: usize) -> u64 {
    splitmix64(seed ^ (index as u64).wrapping_mul(GOLDEN_GAMMA))
}

/// Chooses the value range `(lo, hi)` of a generated tensor by its name and shape. The
/// first matching rule wins. Returns `None` for names no rule covers, and for `w_perm`,
/// which is a permutation.
pub fn value_range(name: &str, shape: &[usize]) -> Option<(f64, f64)> {
    let range = if name.ends_with(".w_perm") {
        return None;
    } else if name.ends_with(".global_scale") {
        // g = 0.2 ln(1 + e^(gs/2)) in [0.80, 1.20], away from its initial value 1.
        (8.0, 12.0)
    } else if name.ends_with(".global_offset") || name.ends_with(".running_mean") {
        (-0.1, 0.1)
    } else if name.ends_with(".running_var") {
        (0.5, 1.5)
    } else if name.ends_with(".se.conv_expand.bias") {
        (1.0, 3.0)
    } else if name.ends_with(".cls_token") || name.ends_with(".pos_embed") {
        (-1.0, 1.0)
    } else if shape.len() == 1 && (name.ends_with(".weight") || name.ends_with(".gamma")) {
        // BatchNorm or LayerNorm scale, or LayerScale.
        (0.5, 1.5)
    } else if shape.len() == 1 && name.ends_with(".bias") {
        (-0.1, 0.1)
    } else if shape.len() >= 2 && name.ends_with(".weight") {
        let fan_in: usize = shape[1..].iter().product();
        let backbone = name.starts_with(&format!("{BACKBONE_PREFIX}."));
        let resnet_branch = name.starts_with(&format!("{BACKBONE_PREFIX}.layer"))
            && (name.ends_with(".conv2.weight") || name.ends_with(".conv3.weight"));
        let residual_branch = resnet_branch || is_efficientnet_residual_projection(name);
        let unit_gain = [
            ".conv_pwl.weight",
            ".downsample.0.weight",
            ".attn.qkv.weight",
            ".attn.proj.weight",
            ".mlp.fc2.weight",
        ];
        let gain = if residual_branch {
            1.0
        } else if backbone && !unit_gain.iter().any(|suffix| name.ends_with(suffix)) {
            6.0
        } else {
            3.0
        };
        let bound = (gain / fan_in as f64).sqrt();
        (-bound, bound)
    } else {
        return None;
    };
    Some(range)
}

/// Tells whether `name` is the last convolution of an EfficientNet residual branch:
/// `backbone.blocks.{s}.{i}.conv_pwl.weight`, or `backbone.blocks.0.{i}.conv_pw.weight`
/// in the depthwise-separable stage 0, for any block `i >= 1`. The first block of each
/// stage changes the width and has no skip connection, so it is excluded.
fn is_efficientnet_residual_projection(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(&format!("{BACKBONE_PREFIX}.blocks.")) else {
        return false;
    };
    let mut parts = rest.splitn(3, '.');
    let (Some(stage), Some(block), Some(conv)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(stage), Ok(block)) = (stage.parse::<usize>(), block.parse::<usize>()) else {
        return false;
    };
    block >= 1 && (conv == "conv_pwl.weight" || (stage == 0 && conv == "conv_pw.weight"))
}

/// Generates the values of a tensor that has a [`value_range`], in row-major order.
pub fn synthetic_values(name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
    let (lo, hi) = value_range(name, shape).ok_or_else(|| ModelError::InvalidField {
        field: name.to_string(),
        reason: format!("the synthetic generator has no rule for shape {shape:?}"),
    })?;
    let seed = fnv1a64(name);
    let n: usize = shape.iter().product();
    let scale = 1.0 / f64::from(1u32 << 24);
    Ok((0..n)
        .map(|i| {
            let u = (element_key(seed, i) >> 40) as f64 * scale;
            (lo + (hi - lo) * u) as f32
        })
        .collect())
}

/// Generates the permutation of `channels` channels for the tensor `name`: the indices
/// that sort the element keys in ascending order.
pub fn synthetic_permutation(name: &str, channels: usize) -> Vec<usize> {
    let seed = fnv1a64(name);
    let mut perm: Vec<usize> = (0..channels).collect();
    // A stable sort, as the Python generator's argsort(kind="stable").
    perm.sort_by_key(|&i| element_key(seed, i));
    perm
}

/// Lists the name and shape of every tensor in a model file for `config`, in the order
/// that [`super::PatchFlow::new`] reads them.
pub fn tensor_shapes(config: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    let backbone = backbone_config(&config.backbone)?;
    let mut shapes: Vec<(String, Vec<usize>)> = backbone
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| (format!("{BACKBONE_PREFIX}.{name}"), shape))
        .collect();
    let (f, hidden) = (config.flow_feature_dim, config.flow_hidden_dim);
    let fused = super::fused_channels(config, &backbone);
    shapes.push((format!("{ADAPTOR_PREFIX}.weight"), vec![f, fused, 1, 1]));
    shapes.push((format!("{ADAPTOR_PREFIX}.bias"), vec![f]));
    let (passive, active) = (f - f / 2, f / 2);
    for k in 0..config.flow_steps {
        let p = format!("{FLOW_PREFIX}.module_list.{k}");
        let block = [
            ("global_scale", vec![1, f, 1, 1]),
            ("global_offset", vec![1, f, 1, 1]),
            ("w_perm", vec![f, f, 1, 1]),
            ("subnet.0.weight", vec![hidden, passive, 3, 3]),
            ("subnet.0.bias", vec![hidden]),
            ("subnet.1.weight", vec![2 * active, hidden, 3, 3]),
            ("subnet.1.bias", vec![2 * active]),
            ("subnet.2.weight", vec![2 * active]),
            ("subnet.2.bias", vec![2 * active]),
            ("subnet.2.running_mean", vec![2 * active]),
            ("subnet.2.running_var", vec![2 * active]),
        ];
        shapes.extend(
            block
                .into_iter()
                .map(|(name, shape)| (format!("{p}.{name}"), shape)),
        );
    }
    Ok(shapes)
}

/// Generates every tensor of a model file for `config` on the CPU, as f32.
pub fn synthetic_tensors(config: &ModelConfig) -> Result<HashMap<String, Tensor>, ModelError> {
    config.validate().map_err(ModelError::InvalidConfig)?;
    let device = Device::Cpu;
    let mut out = HashMap::new();
    for (name, shape) in tensor_shapes(config)? {
        let tensor = if name.ends_with(".w_perm") {
            permutation_matrix(&synthetic_permutation(&name, shape[0]), &device)?
        } else {
            Tensor::from_vec(synthetic_values(&name, &shape)?, shape.as_slice(), &device)?
        };
        out.insert(name, tensor);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_known_values() {
        // Published FNV-1a 64-bit test vectors.
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn splitmix64_known_values() {
        // The first outputs of the reference splitmix64 generator seeded with 0 are
        // splitmix64(0), splitmix64(gamma), ...
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(GOLDEN_GAMMA), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn values_stay_in_range() {
        let values = synthetic_values("backbone.bn1.running_var", &[1000]).unwrap();
        assert!(values.iter().all(|v| (0.5..1.5).contains(v)));
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn permutation_is_complete() {
        let mut perm = synthetic_permutation("flow.module_list.0.w_perm", 33);
        assert_ne!(perm, (0..33).collect::<Vec<_>>());
        perm.sort_unstable();
        assert_eq!(perm, (0..33).collect::<Vec<_>>());
    }

    #[test]
    fn tensors_build_a_model() {
        let config = ModelConfig {
            input_size: [32, 32],
            ..ModelConfig::lite0()
        };
        let tensors = synthetic_tensors(&config).unwrap();
        assert_eq!(tensors.len(), tensor_shapes(&config).unwrap().len());
        let weights =
            super::super::Weights::new(tensors, &Device::Cpu, candle_core::DType::F32).unwrap();
        super::super::PatchFlow::new(&config, &weights).unwrap();
    }
}
