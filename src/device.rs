// SPDX-License-Identifier: MIT OR Apache-2.0
//! Compute device selection by name: `cpu`, `cuda` or `cuda:N`.

use candle_core::Device;

/// Parses a device name. CUDA names need a build with the `cuda` feature.
pub fn parse(name: &str) -> candle_core::Result<Device> {
    let name = name.trim();
    if name.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                candle_core::Error::msg(format!(
                    "invalid device {name:?}: expected cpu, cuda or cuda:N"
                ))
            })?,
        None => candle_core::bail!("invalid device {name:?}: expected cpu, cuda or cuda:N"),
    };
    if !cfg!(feature = "cuda") {
        candle_core::bail!(
            "device {name:?} needs a build with the `cuda` feature; this build runs on cpu only"
        );
    }
    Device::new_cuda(ordinal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse(" CPU ").unwrap().is_cpu());
    }

    #[test]
    fn bad_names_are_rejected() {
        for name in ["gpu", "cuda:x", "cuda0", ""] {
            let err = parse(name).unwrap_err().to_string();
            assert!(
                err.contains("expected cpu, cuda or cuda:N"),
                "{name}: {err}"
            );
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_needs_the_feature() {
        let err = parse("cuda:0").unwrap_err().to_string();
        assert!(err.contains("`cuda` feature"), "{err}");
    }
}
