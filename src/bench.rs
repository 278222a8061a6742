// SPDX-License-Identifier: MIT OR Apache-2.0
//! The inference benchmark: per-frame latency (p50, p95), throughput, the split between
//! backbone, fusion and flow, and peak resident memory, for one model configuration,
//! batch size and thread count per process.
//!
//! `patchflow bench` runs each combination in a child process with
//! `RAYON_NUM_THREADS` set, because candle sizes its thread pools once per process and
//! because peak memory is only meaningful per process.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, PatchFlow, Weights, synthetic};

/// Named configurations the benchmark accepts.
pub const CONFIGS: [&str; 3] = ["lite0", "b5", "resnet18"];

/// Largest batch size the benchmark accepts.
pub const MAX_BATCH: usize = 64;
/// Largest thread count the benchmark accepts.
pub const MAX_THREADS: usize = 256;
/// Largest number of timed or warm-up passes the benchmark accepts.
pub const MAX_PASSES: usize = 10_000;
/// Maximum time limit per measurement, in seconds (one day).
pub const MAX_SECONDS: f64 = 86_400.0;

/// Builds the model of a named configuration with deterministic synthetic weights.
/// Speed does not depend on the weight values, and synthetic weights let every
/// configuration run without downloading its pretrained backbone.
pub fn synthetic_model(name: &str, device: &Device) -> Result<PatchFlow> {
    let config = ModelConfig::preset(name).with_context(|| {
        format!(
            "unknown benchmark configuration {name:?}; known: {}",
            CONFIGS.join(", ")
        )
    })?;
    let tensors = synthetic::synthetic_tensors(&config)?;
    let weights = Weights::new(tensors, device, DType::F32)?;
    Ok(PatchFlow::new(&config, &weights)?)
}

/// One benchmark measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    pub config: String,
    pub input: [usize; 2],
    pub batch: usize,
    pub threads: usize,
    pub iterations: usize,
    /// Median and 95th percentile wall time of one batch, in milliseconds.
    pub p50_ms: f64,
    pub p95_ms: f64,
    /// Images per second at the median batch time.
    pub images_per_second: f64,
    /// Median time of each stage for one batch, in milliseconds.
    pub backbone_ms: f64,
    pub fusion_ms: f64,
    pub flow_ms: f64,
    /// Peak resident set size of the process, in MiB (Linux `VmHWM`).
    pub peak_rss_mib: f64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Peak resident set size of this process in MiB, from `/proc/self/status`.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// How long and how often to measure.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub warmup: usize,
    pub iterations: usize,
    /// Stop after this much timed work, once at least 3 iterations ran.
    pub max_time: Duration,
}

/// Times forward passes of `model` on a fixed input batch after `budget.warmup` untimed
/// ones. The input is a deterministic pattern, not zeros, so that no layer gets a
/// degenerate all-constant map.
pub fn measure(model: &PatchFlow, name: &str, batch: usize, budget: Budget) -> Result<BenchResult> {
    // On a pool thread, as `PatchFlow::forward` runs, so that the stages timed one by
    // one below run as they do inside a forward pass.
    crate::device::on_cpu_pool(|| measure_here(model, name, batch, budget))
}

fn measure_here(
    model: &PatchFlow,
    name: &str,
    batch: usize,
    budget: Budget,
) -> Result<BenchResult> {
    if batch == 0 {
        bail!("batch size must be at least 1");
    }
    let [h, w] = model.config().input_size;
    let n = batch * 3 * h * w;
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let x = Tensor::from_vec(data, (batch, 3, h, w), model.device())?.to_dtype(DType::F32)?;
    let sync = |t: &Tensor| -> Result<()> {
        // Reading one value waits for asynchronous devices to finish.
        t.flatten_all()?.narrow(0, 0, 1)?.to_vec1::<f32>()?;
        Ok(())
    };
    for _ in 0..budget.warmup {
        sync(&model.forward(&x)?.score)?;
    }
    let (mut total, mut backbone, mut fusion, mut flow) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..budget.iterations.max(1) {
        if i >= 3 && started.elapsed() > budget.max_time {
            break;
        }
        let t0 = Instant::now();
        let feats = model.extract(&x)?;
        sync(feats.last().context("the backbone returned no features")?)?;
        let t1 = Instant::now();
        let fused = model.fuse(&feats)?;
        sync(&fused)?;
        let t2 = Instant::now();
        sync(&model.score_fused(&fused)?.score)?;
        let t3 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        total.push(ms(t0, t3));
        backbone.push(ms(t0, t1));
        fusion.push(ms(t1, t2));
        flow.push(ms(t2, t3));
    }
    let p50 = median(&mut total.clone());
    Ok(BenchResult {
        config: name.to_string(),
        input: [h, w],
        batch,
        threads: candle_core::utils::get_num_threads(),
        iterations: total.len(),
        p50_ms: p50,
        p95_ms: percentile(&mut total, 0.95),
        images_per_second: batch as f64 * 1e3 / p50,
        backbone_ms: median(&mut backbone),
        fusion_ms: median(&mut fusion),
        flow_ms: median(&mut flow),
        peak_rss_mib: peak_rss_mib().unwrap_or(f64::NAN),
    })
}

/// One line of the benchmark table: our measurement and, when run, PyTorch's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRow {
    pub ours: BenchResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch: Option<BenchResult>,
}

impl BenchRow {
    /// Our median time over PyTorch's: below 1 means we are faster.
    pub fn ratio(&self) -> Option<f64> {
        self.torch.as_ref().map(|t| self.ours.p50_ms / t.p50_ms)
    }
}

/// The settings of a benchmark matrix.
#[derive(Debug, Clone)]
pub struct MatrixOptions {
    pub configs: Vec<String>,
    pub batches: Vec<usize>,
    pub threads: Vec<usize>,
    pub budget: Budget,
    /// Python interpreter of the reference environment, to time anomalib's model too.
    pub torch_python: Option<std::path::PathBuf>,
}

fn budget_args(budget: &Budget) -> Vec<String> {
    vec![
        "--warmup".into(),
        budget.warmup.to_string(),
        "--iterations".into(),
        budget.iterations.to_string(),
        "--max-seconds".into(),
        budget.max_time.as_secs_f64().to_string(),
    ]
}

/// Runs one child process and parses the JSON result it prints last.
fn run_child(mut cmd: std::process::Command, what: &str) -> Result<BenchResult> {
    end_with_parent(&mut cmd);
    let output = cmd
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        if stderr.is_empty() {
            bail!("{what} failed ({}) without output", output.status);
        }
        bail!("{what} failed ({}): {stderr}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{what} printed no result"))?;
    serde_json::from_str(line).with_context(|| format!("cannot parse the result of {what}: {line}"))
}

/// Makes a measuring child receive SIGTERM when this process ends, so that stopping
/// `patchflow bench` with a plain `kill` does not leave the child measuring.
#[cfg(target_os = "linux")]
fn end_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn end_with_parent(_cmd: &mut std::process::Command) {}

/// Runs every (configuration, batch, threads) combination, each in its own child
/// process of `exe` (this program, with `bench --single`), and, when asked, the same
/// combination through `scripts/reference/bench_torch.py`.
pub fn run_matrix(
    exe: &std::path::Path,
    opts: &MatrixOptions,
    mut progress: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for config in &opts.configs {
        for &batch in &opts.batches {
            for &threads in &opts.threads {
                let mut cmd = std::process::Command::new(exe);
                cmd.args([
                    "bench",
                    "--single",
                    "--configs",
                    config,
                    "--batch",
                    &batch.to_string(),
                ])
                .args(budget_args(&opts.budget))
                .env("RAYON_NUM_THREADS", threads.to_string());
                let ours = run_child(
                    cmd,
                    &format!("the {config} benchmark (batch {batch}, {threads} threads)"),
                )?;
                let torch = match &opts.torch_python {
                    Some(python) => {
                        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                            .join("scripts/reference/bench_torch.py");
                        let mut cmd = std::process::Command::new(python);
                        cmd.arg(script)
                            .args([
                                "--config",
                                config,
                                "--batch",
                                &batch.to_string(),
                                "--threads",
                                &threads.to_string(),
                            ])
                            .args(budget_args(&opts.budget));
                        let what = format!(
                            "the PyTorch {config} benchmark (batch {batch}, {threads} threads)"
                        );
                        Some(run_child(cmd, &what).with_context(|| {
                            format!(
                                "{} must be the Python of the reference environment, with torch, \
                                 timm and anomalib 2.7.0 (scripts/reference/README.md)",
                                python.display()
                            )
                        })?)
                    }
                    None => None,
                };
                let row = BenchRow { ours, torch };
                progress(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// Formats results as a Markdown table.
pub fn markdown(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| config | input | batch | threads | p50 ms | p95 ms | images/s | backbone ms | fusion ms | flow ms | peak RSS MiB | PyTorch p50 ms | PyTorch peak RSS MiB | ours / PyTorch |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows {
        let r = &row.ours;
        let (torch_ms, torch_rss, ratio) = match (&row.torch, row.ratio()) {
            (Some(t), Some(ratio)) => (
                format!("{:.1}", t.p50_ms),
                format!("{:.0}", t.peak_rss_mib),
                format!("{ratio:.2}"),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "| {} | {}x{} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {torch_ms} | {torch_rss} | {ratio} |\n",
            r.config, r.input[0], r.input[1], r.batch, r.threads, r.p50_ms, r.p95_ms, r.images_per_second,
            r.backbone_ms, r.fusion_ms, r.flow_ms, r.peak_rss_mib
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median(&mut v), 3.0);
        assert_eq!(percentile(&mut v, 0.95), 5.0);
        assert_eq!(percentile(&mut v, 0.2), 1.0);
    }

    #[test]
    fn synthetic_lite0_measures() {
        let model = synthetic_model("lite0", &Device::Cpu).unwrap();
        let budget = Budget {
            warmup: 0,
            iterations: 2,
            max_time: Duration::from_secs(60),
        };
        let r = measure(&model, "lite0", 1, budget).unwrap();
        assert_eq!(r.iterations, 2);
        assert_eq!(r.input, [256, 256]);
        assert!(r.p50_ms > 0.0);
        assert!(r.p95_ms >= r.p50_ms);
        assert!(r.backbone_ms > 0.0);
        assert!(r.flow_ms > 0.0);
        let table = markdown(&[BenchRow {
            ours: r,
            torch: None,
        }]);
        assert_eq!(table.lines().count(), 3);
        assert!(table.contains("| lite0 | 256x256 | 1 |"), "{table}");
    }

    #[test]
    fn unknown_config_is_named() {
        let err = synthetic_model("vgg", &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vgg"), "{err}");
        assert!(err.contains("lite0, b5, resnet18"), "{err}");
    }

    #[test]
    fn reads_peak_rss() {
        let rss = peak_rss_mib().expect("Linux reports VmHWM");
        assert!(rss > 1.0, "{rss}");
    }
}
