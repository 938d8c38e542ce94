//! What the benchmarks share: the machine's measured ceilings and one report line per kernel.
//!
//! Every benchmark reports, per kernel and shape: time, GFLOP/s, GB/s, the fraction of the
//! machine's ceiling measured in the same run, and speed-ups over baselines. Lines also go, as
//! JSON, to `$METAKERNELS_BENCH_JSON` when set (the GPU bundle collects them into its summary).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::device::Kind;
use crate::{Device, Result};

/// The measured ceilings of one device.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// f32 GEMM rate, GFLOP/s (CPU: matrixmultiply on all rayon threads; GPU: not measured).
    pub f32_gemm_gflops: f64,
    /// Device-to-device copy bandwidth, GB/s counted as bytes read + bytes written (CPU: memcpy
    /// on all threads).
    pub copy_gbps: f64,
}

/// Whether the benchmarks should measure and report their CPU shapes: false when
/// `METAKERNELS_BENCH_SKIP_CPU=1`, which the GPU bundle's run.sh sets so that scarce device
/// time goes to the CUDA reports.
pub fn cpu_reports_enabled() -> bool {
    !std::env::var("METAKERNELS_BENCH_SKIP_CPU").is_ok_and(|v| v == "1")
}

/// The CPU's ceilings, measured once per process (about half a second).
pub fn cpu_ceilings() -> Ceilings {
    static CPU: OnceLock<Ceilings> = OnceLock::new();
    *CPU.get_or_init(|| Ceilings { f32_gemm_gflops: cpu_sgemm_gflops(), copy_gbps: cpu_copy_gbps() })
}

/// f32 GEMM rate of this machine: 512³ products, one per rayon thread, best of a few runs.
pub fn cpu_sgemm_gflops() -> f64 {
    use rayon::prelude::*;
    let n = 512;
    let threads = rayon::current_num_threads();
    let a: Vec<f32> = (0..n * n).map(|i| ((i % 97) as f32) * 0.01).collect();
    let mut outs = vec![vec![0f32; n * n]; threads];
    let mut best = 0f64;
    for _ in 0..4 {
        let start = std::time::Instant::now();
        outs.par_iter_mut().for_each(|c| {
            let m = crate::cpu::Mat::new(&a, n, n);
            crate::cpu::sgemm(1.0, m, m, 0.0, c, n);
        });
        let secs = start.elapsed().as_secs_f64();
        best = best.max(2.0 * (n * n * n * threads) as f64 / secs / 1e9);
    }
    best
}

/// Memory copy bandwidth of this machine (bytes read + written), 64 MiB per thread.
pub fn cpu_copy_gbps() -> f64 {
    use rayon::prelude::*;
    let len = 16 << 20; // f32s = 64 MiB
    let threads = rayon::current_num_threads();
    let src = vec![1f32; len * threads];
    let mut dst = vec![0f32; len * threads];
    let mut best = 0f64;
    for _ in 0..4 {
        let start = std::time::Instant::now();
        dst.par_chunks_mut(len).zip(src.par_chunks(len)).for_each(|(d, s)| d.copy_from_slice(s));
        let secs = start.elapsed().as_secs_f64();
        best = best.max(2.0 * (len * threads * 4) as f64 / secs / 1e9);
    }
    std::hint::black_box(&dst);
    best
}

/// Device-to-device copy bandwidth of a CUDA device (bytes read + written), 1 GiB copies.
pub fn device_copy_gbps(device: &Device) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let crate::device::Kind::Cuda(d) = &device.0 {
        return d.copy_bandwidth_gbps(1 << 30);
    }
    let _ = device;
    Ok(cpu_ceilings().copy_gbps)
}

/// Peak tensor-core matrix rate of a CUDA device for `dtype` (bf16 or f16), TFLOP/s, measured
/// with mma.sync m16n8k16 chains (`kernels/ceiling.cu`); for f32 the SIMT FMA peak.
///
/// Errors on the CPU, or for other dtypes.
pub fn device_matrix_tflops(device: &Device, dtype: crate::DType) -> Result<f64> {
    use crate::DType;
    let kernel = match dtype {
        DType::BF16 => "ceiling_mma_bf16",
        DType::F16 => "ceiling_mma_f16",
        DType::F32 => "ceiling_fma_f32",
        other => {
            return Err(crate::Error::UnsupportedDType {
                op: "device_matrix_tflops",
                dtype: other,
                supported: "bf16, f16, f32",
            })
        }
    };
    #[cfg(feature = "cuda")]
    if let crate::device::Kind::Cuda(d) = &device.0 {
        return d.peak_tflops(kernel);
    }
    let _ = kernel;
    Err(crate::Error::invalid("device_matrix_tflops", "device", format!("{device} is not a CUDA device")))
}

/// One benchmark measurement.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    /// Family/kernel, e.g. `linear_attention/forward_causal`.
    pub kernel: String,
    /// Shape and options, e.g. `B1 H8 T4096 D64 f32`.
    pub shape: String,
    /// Device, e.g. `cpu` or `cuda:0 (NVIDIA H200)`.
    pub device: String,
    /// Time per call, milliseconds (best of the repetitions).
    pub ms: f64,
    /// Useful floating-point operations per call.
    pub flops: f64,
    /// Minimum bytes moved per call.
    pub bytes: f64,
    /// (name, rate) of the ceiling this kernel is held against, in the unit of its kind
    /// (GFLOP/s for compute ceilings, GB/s for bandwidth ceilings).
    pub ceiling: Option<(String, f64)>,
    /// (baseline name, its time in ms) for speed-up ratios.
    pub baselines: Vec<(String, f64)>,
}

impl Measurement {
    /// GFLOP/s achieved.
    pub fn gflops(&self) -> f64 {
        self.flops / self.ms / 1e6
    }

    /// GB/s achieved.
    pub fn gbps(&self) -> f64 {
        self.bytes / self.ms / 1e6
    }

    /// Achieved / ceiling, where the ceiling's unit decides which rate is compared.
    pub fn fraction_of_ceiling(&self) -> Option<f64> {
        self.ceiling.as_ref().map(|(name, rate)| {
            let achieved = if name.contains("GB/s") { self.gbps() } else { self.gflops() };
            achieved / rate
        })
    }

    /// Prints the line and appends it as JSON to `$METAKERNELS_BENCH_JSON` when set.
    pub fn report(&self) {
        let mut line = format!(
            "[metakernels] {:<44} {:<28} {:<10} {:>10.4} ms {:>9.2} GFLOP/s {:>8.2} GB/s",
            self.kernel,
            self.shape,
            self.device,
            self.ms,
            self.gflops(),
            self.gbps()
        );
        if let (Some((name, rate)), Some(frac)) = (&self.ceiling, self.fraction_of_ceiling()) {
            line += &format!("  {:.1}% of {name} {rate:.1}", frac * 100.0);
        }
        for (name, ms) in &self.baselines {
            line += &format!("  {:.2}x vs {name}", ms / self.ms);
        }
        println!("{line}");
        if let Some(path) = std::env::var_os("METAKERNELS_BENCH_JSON") {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{}", self.to_json());
            }
        }
    }

    fn to_json(&self) -> String {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let baselines: Vec<String> = self
            .baselines
            .iter()
            .map(|(n, ms)| format!("{{\"name\":\"{}\",\"ms\":{ms},\"speedup\":{}}}", esc(n), ms / self.ms))
            .collect();
        format!(
            "{{\"kernel\":\"{}\",\"shape\":\"{}\",\"device\":\"{}\",\"ms\":{},\"gflops\":{},\"gbps\":{},\"ceiling\":{},\"fraction_of_ceiling\":{},\"baselines\":[{}]}}",
            esc(&self.kernel),
            esc(&self.shape),
            esc(&self.device),
            self.ms,
            self.gflops(),
            self.gbps(),
            self.ceiling.as_ref().map(|(n, r)| format!("{{\"name\":\"{}\",\"rate\":{r}}}", esc(n))).unwrap_or("null".into()),
            self.fraction_of_ceiling().map(|f| f.to_string()).unwrap_or("null".into()),
            baselines.join(",")
        )
    }
}

/// Best time in ms of `reps` calls of `f` on `device` after one warm-up call (CUDA events on a
/// GPU, wall clock on the CPU).
pub fn best_ms<F: FnMut() -> Result<()>>(device: &Device, reps: usize, mut f: F) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        best = best.min(device.time_ms(&mut f)?);
    }
    Ok(best)
}

/// A global allocator for benchmark binaries: the system allocator, counting the bytes live on
/// the heap and their high-water mark so that [`peak_bytes`] can measure a CPU call. Install it
/// with `#[global_allocator] static ALLOC: CountingAllocator = CountingAllocator;`.
pub struct CountingAllocator;

static HEAP_LIVE: AtomicUsize = AtomicUsize::new(0);
static HEAP_PEAK: AtomicUsize = AtomicUsize::new(0);
static HEAP_COUNTED: AtomicBool = AtomicBool::new(false);

fn heap_grew(bytes: usize) {
    if !HEAP_COUNTED.load(Ordering::Relaxed) {
        HEAP_COUNTED.store(true, Ordering::Relaxed);
    }
    let live = HEAP_LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    HEAP_PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            heap_grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            heap_grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        HEAP_LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                heap_grew(new_size - layout.size());
            } else {
                HEAP_LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// The memory high-water mark of `f`: the most bytes it held at once beyond what was live when
/// it started, outputs included (they are live when it returns). On the CPU the heap under
/// [`CountingAllocator`] (`None`, without running `f`, when the binary did not install it); on a
/// GPU the device's stream-ordered memory pool (`None` where allocations bypass it).
pub fn peak_bytes<F: FnOnce() -> Result<()>>(device: &Device, f: F) -> Result<Option<usize>> {
    match &device.0 {
        Kind::Cpu => {
            if !HEAP_COUNTED.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let base = HEAP_LIVE.load(Ordering::Relaxed);
            HEAP_PEAK.store(base, Ordering::Relaxed);
            f()?;
            Ok(Some(HEAP_PEAK.load(Ordering::Relaxed).saturating_sub(base)))
        }
        #[cfg(feature = "cuda")]
        Kind::Cuda(d) => d.pool_peak_bytes(f),
    }
}

/// The host memory available now (MemAvailable on Linux), in bytes; `None` where the host does
/// not say. For benchmarks that need gigabytes, to skip rather than abort.
pub fn available_host_bytes() -> Option<usize> {
    crate::cpu::host_available_bytes()
}

/// GFLOP/s of the CPU linear attention's chunk-product GEMM and of `matrixmultiply`, one thread,
/// m×k · k×n products in cache (see `cpu_gemm.rs`): (in-house, matrixmultiply).
pub fn linear_attention_chunk_gemm_rates(m: usize, k: usize, n: usize) -> (f64, f64) {
    crate::ops::linear_attention::chunk_gemm_rates(m, k, n)
}

/// Whether the CPU linear attention's `KernelPath::Auto` takes the split form for `heads`
/// (sequence, head)s on the current rayon pool: the rule the benchmarks time against both forms.
pub fn linear_attention_cpu_auto_splits(heads: usize) -> bool {
    crate::ops::linear_attention::cpu_auto_splits(heads)
}
