// SPDX-License-Identifier: MIT OR Apache-2.0
//! Compute device selection by name (`cpu`, `cuda` or `cuda:N`) and the number of CPU
//! threads that inference uses.

use candle_core::Device;

/// Runs `f` on a thread of the inference pool and returns its result.
///
/// A forward pass runs hundreds of short parallel loops. Started from a thread outside
/// the pool, each loop hands its work to the pool and puts the caller to sleep until it
/// ends, which costs a wake-up and a sleep per loop. Started on a pool thread, the loops
/// split their work in place. Called on a pool thread, `f` runs there directly.
pub fn on_cpu_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Sets the number of threads of the process-wide pool that CPU inference runs on, and
/// returns the number in force. 0 keeps the default: `RAYON_NUM_THREADS` when set, else
/// one thread per logical CPU.
///
/// The pool starts with the first parallel operation and keeps its size for the life of
/// the process, so this must run before any model is used. Afterwards, a different
/// count is an error that names the count in force.
pub fn set_cpu_threads(threads: usize) -> Result<usize, String> {
    if threads == 0 {
        return Ok(rayon::current_num_threads());
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("patchflow-cpu-{i}"))
        .build_global()
    {
        Ok(()) => Ok(threads),
        Err(_) if rayon::current_num_threads() == threads => Ok(threads),
        Err(_) => Err(format!(
            "cannot use {threads} CPU threads: this process already runs inference on {} \
             (the count is fixed at the first use; set it before any model runs, or with \
             RAYON_NUM_THREADS)",
            rayon::current_num_threads()
        )),
    }
}

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
    fn cpu_threads_are_fixed_once_used() {
        let first = set_cpu_threads(3).unwrap_or_else(|_| rayon::current_num_threads());
        assert_eq!(rayon::current_num_threads(), first);
        assert_eq!(set_cpu_threads(first), Ok(first));
        assert_eq!(set_cpu_threads(0), Ok(first));
        let error = set_cpu_threads(first + 1).unwrap_err();
        assert!(
            error.contains(&format!("already runs inference on {first}")),
            "{error}"
        );
    }

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
