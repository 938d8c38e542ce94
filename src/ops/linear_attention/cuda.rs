//! Launches of `kernels/linear_attention.cu`.
//!
//! Every pass is the chunked core kernel (`la_core_<in>_to_<out>_c<C>`) over a list of work
//! items (runs of rows with an initial and a final state), so the dense and packed layouts,
//! the forward, the three backward passes and the split form share one kernel. Its arguments
//! travel as one `#[repr(C)]` struct mirroring `CoreArgs` in the .cu file.
//!
//! **Forward rule.** One block runs one (sequence, head) × 64-column tile of v. The split form
//! cuts each sequence into G groups of chunks: one launch computes the groups' local states,
//! `la_state_scan` turns them into each group's initial state and the final state, and a
//! second core launch computes all groups' outputs in parallel. It buys parallelism with a
//! second read of k and v, so the rule (`split_groups`) compares waves: with W blocks
//! resident per wave (SMs × the kernel's occupancy), the fused form takes ⌈blocks/W⌉ waves of
//! whole sequences, the split ⌈G·blocks/W⌉ waves of 1/G of a sequence, each group paying the
//! state pass too (counted as half an output pass: it reads k and v, writes no output, and
//! does one of the three chunk products) and its state's trips through memory (written,
//! scanned, read back: 3·Dk·64 floats against the block's q, k, v, o traffic over the
//! sequence). The G with the fewest estimated sequence-times is taken if it beats the fused
//! form by 10%. A momentum term, or sequences under four chunks, stay fused. The constants are
//! reasoned, not yet measured on a GPU: the benchmark times Auto, Fused and Split side by side
//! so the first GPU run can check them.
//!
//! **Tensor cores.** Forward launches with f16/bf16 inputs and no momentum run
//! `la_core_mma_<dt>_c<C>` (every Dk up to 256; chunks of 64 rows, 32 above Dk = 128), whose
//! three chunk products are `mma.sync.m16n8k16` with f32 accumulation; everything else (f32,
//! the momentum forward, and `KernelPath::Simt`, the benchmarks' baseline) runs the SIMT core
//! `la_core_<dt>_to_<dt>_c<C>`.
//!
//! **Backward** (2 launches, both O(T), both the core with other I/O; f16/bf16 without momentum
//! on the tensor-core core, `la_backward_{prep,passes}_mma_<dt>_c<C>`, whose passes round their
//! operands to bf16 (the f32 gradients they carry can leave f16's range) except a normalised
//! dφ(q), which cancellation makes sensitive to rounding; the rest on the SIMT core):
//! `la_backward_prep_<dt>_c<C>` recomputes the forward chunk by chunk and writes
//! g' = [∂L/∂num, ∂L/∂den] (the ∂L/∂den column as one partial per 64-column v tile, summed in
//! a fixed order by the readers); `la_backward_passes_<dt>_c<C>` runs the three passes
//! (dφ(Q) forward in time; dφ(K) and dV' backward in time, the last carrying dS' to dS'_0 and
//! folding in the momentum's reverse sum) side by side as blockIdx.z = 0, 1, 2, reading q, k,
//! v, ∂L/∂o and the states in place and writing dq, dk, dv, ∂S_0, ∂z_0 directly.

use crate::cuda::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use super::{BackwardArgs, BackwardResult, ForwardArgs, ForwardResult, KernelPath, Problem};
use crate::cuda::{driver, grid_1d, CudaDevice, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use crate::tensor::{CudaBuffer, Storage};
use crate::{DType, Error, Result, Tensor};

const MODULE: &str = "linear_attention";
const THREADS: u32 = 256;
const TILE: usize = 64;
const SCAN_THREADS: u32 = 256;

/// Mirrors `Item` in the .cu file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Item {
    row0: i64,
    len: i64,
    state_in: i64,
    state_out: i64,
}

/// Mirrors `CoreArgs` in the .cu file (same field order; repr(C) gives the same padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CoreArgs {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    items: u64,
    n_items: i32,
    dk: i32,
    dv: i32,
    s_in: u64,
    z_in: u64,
    s_out: u64,
    z_out: u64,
    fm: i32,
    causal: i32,
    reverse: i32,
    normalize: i32,
    accumulate: i32,
    scale: f32,
    eps: f32,
    eta: f32,
    mom: u64,
    mom_width: i32,
    mom_ld: i32,
}

/// Mirrors `RefBackwardArgs` in the .cu file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RefBackwardArgs {
    f: CoreArgs,
    grad_out: u64,
    gs: u64,
    gz: u64,
    gp: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    ds0: u64,
    dz0: u64,
}

/// Mirrors `BwdArgs` in the .cu file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BwdArgs {
    q: u64,
    k: u64,
    v: u64,
    g: u64,
    s0: u64,
    z0: u64,
    gs: u64,
    gz: u64,
    gp: u64,
    grad_q: u64,
    grad_k: u64,
    grad_v: u64,
    ds0: u64,
    dz0: u64,
    items: u64,
    n_items: i32,
    dk: i32,
    dv: i32,
    tiles: i32,
    fm: i32,
    causal: i32,
    normalize: i32,
    scale: f32,
    eps: f32,
    eta: f32,
}

// SAFETY: plain-old-data structs of integers and floats whose layout matches the kernels'
// parameter structs field by field.
unsafe impl DeviceRepr for Item {}
unsafe impl DeviceRepr for CoreArgs {}
unsafe impl DeviceRepr for RefBackwardArgs {}
unsafe impl DeviceRepr for BwdArgs {}

// The .cu file static_asserts the same sizes for its side of each struct.
const _: () = assert!(size_of::<Item>() == 32);
const _: () = assert!(size_of::<CoreArgs>() == 136);
const _: () = assert!(size_of::<RefBackwardArgs>() == 208);
const _: () = assert!(size_of::<BwdArgs>() == 160);

/// Raw device pointers for one launch, with the guards that order their use on our stream.
struct Ptrs<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Ptrs<'a> {
    fn new(stream: &'a CudaStream) -> Self {
        Ptrs { stream, guards: Vec::new() }
    }

    fn of<T>(&mut self, s: &'a CudaSlice<T>) -> u64 {
        let (p, g) = s.device_ptr(self.stream);
        self.guards.push(g);
        p
    }

    fn of_mut<T>(&mut self, s: &'a mut CudaSlice<T>) -> u64 {
        let (p, g) = s.device_ptr_mut(self.stream);
        self.guards.push(g);
        p
    }

    fn tensor(&mut self, t: &'a Tensor) -> Result<u64> {
        match t.storage() {
            Storage::Cuda(b) => Ok(match b {
                CudaBuffer::F32(s) => self.of(s),
                CudaBuffer::F64(s) => self.of(s),
                CudaBuffer::F16(s) => self.of(s),
                CudaBuffer::BF16(s) => self.of(s),
                CudaBuffer::U32(s) => self.of(s),
            }),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op: "linear_attention (cuda)",
                expected: "a CUDA device".into(),
                got: "cpu".into(),
            }),
        }
    }

    fn opt_tensor(&mut self, t: Option<&'a Tensor>) -> Result<u64> {
        t.map_or(Ok(0), |t| self.tensor(t))
    }
}

/// A device buffer of any element type, for outputs of the input dtype.
enum Out {
    F32(CudaSlice<f32>),
    F16(CudaSlice<half::f16>),
    BF16(CudaSlice<half::bf16>),
}

impl Out {
    fn alloc(dev: &CudaDevice, dtype: DType, len: usize) -> Result<Out> {
        Ok(match dtype {
            DType::F16 => Out::F16(dev.alloc(len)?),
            DType::BF16 => Out::BF16(dev.alloc(len)?),
            _ => Out::F32(dev.alloc(len)?),
        })
    }

    fn ptr<'a>(&'a mut self, p: &mut Ptrs<'a>) -> u64 {
        match self {
            Out::F32(s) => p.of_mut(s),
            Out::F16(s) => p.of_mut(s),
            Out::BF16(s) => p.of_mut(s),
        }
    }

    fn into_tensor(self, shape: &[usize], device: &crate::Device) -> Tensor {
        let (buffer, dtype) = match self {
            Out::F32(s) => (CudaBuffer::F32(s), DType::F32),
            Out::F16(s) => (CudaBuffer::F16(s), DType::F16),
            Out::BF16(s) => (CudaBuffer::BF16(s), DType::BF16),
        };
        Tensor::from_cuda_buffer(buffer, shape, dtype, device)
    }
}

/// Rows per chunk of either core for a key width `dk` (shared memory bounds it).
fn chunk_for(dk: usize) -> usize {
    if dk <= 128 {
        64
    } else {
        32
    }
}

/// Shared-memory bytes of the core; mirrors `Smem` in the .cu file.
fn core_smem_bytes(c: usize, dk: usize) -> usize {
    let tile_ld = TILE + 1;
    let floats = 2 * c * (dk + 1) + c * tile_ld + c * (c + 1) + dk * tile_ld + dk + c + TILE + c * TILE;
    floats * 4
}

/// Shared-memory bytes of the tensor-core core with chunks of `c` rows; mirrors `SmemMma` in
/// the .cu file.
fn mma_smem_bytes(c: usize, dk: usize) -> usize {
    let dkp = dk.div_ceil(16) * 16;
    let (ldq, ldt) = (dkp + 8, TILE + 8);
    let halves = 2 * c * ldq + 2 * c * ldt + dkp * ldt;
    let floats_start = (halves * 2).div_ceil(16) * 16;
    floats_start + 4 * (dkp * TILE + dkp + c + 2 * c + THREADS as usize / 32 + c * TILE)
}

/// Whether a forward core launch runs on the tensor-core kernel: 16-bit inputs and no momentum
/// term (every key width the API accepts, ≤ 256, has a plan).
fn uses_mma(in_dtype: DType, args: &CoreArgs) -> bool {
    matches!(in_dtype, DType::F16 | DType::BF16) && args.eta < 0.0
}

/// The grid of a core launch: one block per (work item, 64-column v tile, pass).
fn core_grid(n_items: usize, tiles: usize, passes: u32, smem: usize) -> Result<LaunchConfig> {
    let grid_x = u32::try_from(n_items)
        .ok()
        .filter(|&x| x < (1u32 << 31))
        .ok_or_else(|| Error::invalid("LinearAttention (cuda)", "B·H", format!("{n_items} work items")))?;
    Ok(LaunchConfig {
        grid_dim: (grid_x, tiles as u32, passes),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// The forward core kernel for `args` and its dynamic shared memory in bytes; the SIMT core
/// unless `tensor_cores` allows the tensor-core one.
fn core_kernel(in_dtype: DType, args: &CoreArgs, tensor_cores: bool) -> (String, usize) {
    let dk = args.dk as usize;
    let c = chunk_for(dk);
    let dt = in_dtype.as_str();
    if tensor_cores && uses_mma(in_dtype, args) {
        (format!("la_core_mma_{dt}_c{c}"), mma_smem_bytes(c, dk))
    } else {
        (format!("la_core_{dt}_to_{dt}_c{c}"), core_smem_bytes(c, dk))
    }
}

/// Launches the forward core over `items` with `args` (pointers filled in by the caller).
fn launch_core(
    dev: &CudaDevice,
    in_dtype: DType,
    args: &CoreArgs,
    n_items: usize,
    width_v: usize,
    tensor_cores: bool,
) -> Result<()> {
    let (name, smem) = core_kernel(in_dtype, args, tensor_cores);
    let f = dev.function(MODULE, &name)?;
    dev.allow_shared_bytes(&f, &name, smem)?;
    if n_items == 0 {
        return Ok(());
    }
    let cfg = core_grid(n_items, width_v.div_ceil(TILE), 1, smem)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(args);
    // SAFETY: every pointer in `args` addresses a live buffer sized for the items' rows and
    // states (built by the callers below), the struct mirrors the kernel's parameter, the grid
    // covers items × v tiles, and the dynamic shared memory matches the kernel's plan.
    unsafe { b.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
    Ok(())
}

fn fill_core_options(args: &mut CoreArgs, p: &Problem) {
    args.fm = p.cfg.feature_map.code();
    args.causal = p.cfg.causal as i32;
    args.normalize = p.cfg.normalize as i32;
    args.scale = p.cfg.scale;
    args.eps = p.cfg.eps;
    args.accumulate = 1;
    args.eta = -1.0;
}

/// One item per segment, starting from its initial state (when there is one).
fn segment_items(p: &Problem, has_initial: bool) -> Vec<Item> {
    p.segments
        .iter()
        .map(|s| Item {
            row0: s.row0 as i64,
            len: s.len as i64,
            state_in: if has_initial { s.state as i64 } else { -1 },
            state_out: s.state as i64,
        })
        .collect()
}

fn sm_count(dev: &CudaDevice) -> Result<usize> {
    dev.sm_count()
}

/// The number of chunk groups per sequence for the split form, or 1 for the fused form.
fn split_groups(dev: &CudaDevice, p: &Problem, a: &ForwardArgs<'_>, path: KernelPath) -> Result<usize> {
    if p.momentum.is_some() || matches!(path, KernelPath::Fused | KernelPath::Reference | KernelPath::Simt) {
        return Ok(1);
    }
    // Chunk boundaries of the groups must be chunk boundaries of both cores: 64 is a multiple
    // of 32.
    let c = 64;
    let max_chunks = p.segments.iter().map(|s| s.len.div_ceil(c)).max().unwrap_or(1);
    let blocks = p.segments.len() * p.dv.div_ceil(TILE);
    if path == KernelPath::Split {
        return Ok((2 * sm_count(dev)?).div_ceil(blocks.max(1)).min(max_chunks));
    }
    if max_chunks < 4 {
        return Ok(1);
    }
    let mut args = CoreArgs { dk: p.dk as i32, eta: -1.0, ..CoreArgs::default() };
    fill_core_options(&mut args, p);
    let (name, smem) = core_kernel(a.q.dtype(), &args, true);
    let f = dev.function(MODULE, &name)?;
    dev.allow_shared_bytes(&f, &name, smem)?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)
        .map_err(driver(format!("occupancy of {name}")))?;
    let per_wave = sm_count(dev)? * (per_sm as usize).max(1);
    // A group's state trips against one block's traffic over its whole sequence.
    let longest = p.segments.iter().map(|s| s.len).max().unwrap_or(1);
    let sequence_bytes = longest * (2 * p.dk + 2 * TILE) * a.q.dtype().size_in_bytes();
    let group_overhead = (3 * p.dk * TILE * 4) as f64 / sequence_bytes.max(1) as f64;
    Ok(cheapest_groups(blocks, per_wave, max_chunks, p.cfg.causal, group_overhead))
}

/// The split form's state pass, in output passes (see the module docs).
const STATE_PASS_SHARE: f64 = 0.5;

/// The forward rule's choice (module docs): 1 (fused) or the number of groups G ≥ 2 whose
/// estimated time, in waves × the share of a whole sequence each block runs, is lowest, when it
/// beats the fused form by 10%. `per_wave`: blocks resident at once; `max_chunks`: the longest
/// sequence's chunks (a group holds at least one); `group_overhead`: one group's state traffic
/// in whole-sequence units.
fn cheapest_groups(
    blocks: usize,
    per_wave: usize,
    max_chunks: usize,
    causal: bool,
    group_overhead: f64,
) -> usize {
    let waves = |n: usize| n.div_ceil(per_wave.max(1)) as f64;
    // Non-causal, the fused form sweeps k and v twice too (the whole state first).
    let fused = waves(blocks) * if causal { 1.0 } else { 1.0 + STATE_PASS_SHARE };
    let split = |g: usize| waves(g * blocks) * ((1.0 + STATE_PASS_SHARE) / g as f64 + group_overhead);
    let most = max_chunks.min(4 * per_wave.div_ceil(blocks.max(1))).max(2);
    let best = (2..=most).min_by(|&x, &y| split(x).total_cmp(&split(y))).unwrap_or(1);
    if max_chunks >= 2 && split(best) < 0.9 * fused {
        best
    } else {
        1
    }
}

pub(super) fn forward(p: &Problem, a: &ForwardArgs<'_>, path: KernelPath) -> Result<ForwardResult> {
    let dev = a.q.cuda_device()?;
    let dtype = a.q.dtype();
    let states = p.states();
    let mut out = Out::alloc(dev, dtype, p.rows * p.dv)?;
    let mut s_out = dev.alloc::<f32>(states * p.dk * p.dv)?;
    let mut z_out = dev.alloc::<f32>(states * p.dk)?;
    if path == KernelPath::Reference {
        reference_forward(dev, p, a, &mut out, &mut s_out, &mut z_out)?;
    } else {
        let groups = split_groups(dev, p, a, path)?;
        if groups == 1 {
            let tensor_cores = path != KernelPath::Simt;
            fused_forward(dev, p, a, tensor_cores, &mut out, &mut s_out, &mut z_out)?;
        } else {
            split_forward(dev, p, a, groups, &mut out, &mut s_out, &mut z_out)?;
        }
    }
    let mut shape = a.q.shape().to_vec();
    shape[3] = p.dv;
    Ok(ForwardResult {
        output: out.into_tensor(&shape, a.q.device()),
        state: Tensor::from_cuda_buffer(
            CudaBuffer::F32(s_out),
            &[states, p.dk, p.dv],
            DType::F32,
            a.q.device(),
        ),
        normalizer: Tensor::from_cuda_buffer(
            CudaBuffer::F32(z_out),
            &[states, p.dk],
            DType::F32,
            a.q.device(),
        ),
    })
}

fn fused_forward(
    dev: &CudaDevice,
    p: &Problem,
    a: &ForwardArgs<'_>,
    tensor_cores: bool,
    out: &mut Out,
    s_out: &mut CudaSlice<f32>,
    z_out: &mut CudaSlice<f32>,
) -> Result<()> {
    let items = dev.htod(&segment_items(p, a.s0.is_some()))?;
    let stream = dev.stream().clone();
    let mut ptr = Ptrs::new(&stream);
    let mut args =
        CoreArgs { n_items: items.len() as i32, dk: p.dk as i32, dv: p.dv as i32, ..Default::default() };
    fill_core_options(&mut args, p);
    args.q = ptr.tensor(a.q)?;
    args.k = ptr.tensor(a.k)?;
    args.v = ptr.tensor(a.v)?;
    args.out = out.ptr(&mut ptr);
    args.items = ptr.of(&items);
    args.s_in = ptr.opt_tensor(a.s0)?;
    args.z_in = ptr.opt_tensor(a.z0)?;
    args.s_out = ptr.of_mut(s_out);
    args.z_out = ptr.of_mut(z_out);
    if let Some(eta) = p.momentum {
        args.eta = eta;
        args.mom = args.v;
        args.mom_width = p.dv as i32;
        args.mom_ld = p.dv as i32;
    }
    launch_core(dev, a.q.dtype(), &args, p.segments.len(), p.dv, tensor_cores)
}

#[allow(clippy::too_many_arguments)]
fn split_forward(
    dev: &CudaDevice,
    p: &Problem,
    a: &ForwardArgs<'_>,
    groups: usize,
    out: &mut Out,
    s_out: &mut CudaSlice<f32>,
    z_out: &mut CudaSlice<f32>,
) -> Result<()> {
    // Groups are cut at multiples of 64 rows, a chunk boundary of both cores.
    let c = 64;
    let (dk, dv) = (p.dk, p.dv);
    let mut pass1 = Vec::with_capacity(p.segments.len() * groups);
    let mut pass2 = Vec::with_capacity(p.segments.len() * groups);
    for s in &p.segments {
        let rows_per_group = s.len.div_ceil(c).div_ceil(groups) * c;
        for g in 0..groups {
            let start = (g * rows_per_group).min(s.len);
            let end = ((g + 1) * rows_per_group).min(s.len);
            let item = (pass1.len()) as i64;
            let (row0, len) = ((s.row0 + start) as i64, (end - start) as i64);
            pass1.push(Item { row0, len, state_in: -1, state_out: item });
            // Causal: start from the group's prefix state; non-causal: from the total.
            let state_in = if p.cfg.causal { item } else { s.state as i64 };
            pass2.push(Item { row0, len, state_in, state_out: -1 });
        }
    }
    let n_items = pass1.len();
    let items1 = dev.htod(&pass1)?;
    let items2 = dev.htod(&pass2)?;
    let seg_state: Vec<i64> = p.segments.iter().map(|s| s.state as i64).collect();
    let seg_state = dev.htod(&seg_state)?;
    let mut local_s = dev.alloc::<f32>(n_items * dk * dv)?;
    let mut local_z = dev.alloc::<f32>(n_items * dk)?;
    let mut prefix_s = dev.alloc::<f32>(n_items * dk * dv)?;
    let mut prefix_z = dev.alloc::<f32>(n_items * dk)?;
    let stream = dev.stream().clone();
    {
        let mut ptr = Ptrs::new(&stream);
        let mut args =
            CoreArgs { n_items: n_items as i32, dk: dk as i32, dv: dv as i32, ..Default::default() };
        fill_core_options(&mut args, p);
        args.q = ptr.tensor(a.q)?;
        args.k = ptr.tensor(a.k)?;
        args.v = ptr.tensor(a.v)?;
        args.items = ptr.of(&items1);
        args.s_out = ptr.of_mut(&mut local_s);
        args.z_out = ptr.of_mut(&mut local_z);
        launch_core(dev, a.q.dtype(), &args, n_items, dv, true)?;
    }
    {
        let f = dev.function(MODULE, "la_state_scan")?;
        let mut ptr = Ptrs::new(&stream);
        let ptrs = [
            ptr.of(&local_s),
            ptr.of(&local_z),
            ptr.opt_tensor(a.s0)?,
            ptr.opt_tensor(a.z0)?,
            ptr.of(&seg_state),
            ptr.of_mut(&mut prefix_s),
            ptr.of_mut(&mut prefix_z),
            ptr.of_mut(s_out),
            ptr.of_mut(z_out),
        ];
        let (segments, groups_i, dk_i, dv_i) = (p.segments.len() as i32, groups as i32, dk as i32, dv as i32);
        let mut b = stream.launch_builder(&f);
        for x in &ptrs {
            b.arg(x);
        }
        b.arg(&segments).arg(&groups_i).arg(&dk_i).arg(&dv_i);
        let cfg = grid_1d(p.segments.len() * (dk * dv + dk), SCAN_THREADS);
        // SAFETY: the buffers hold n_items (= segments × groups) local and prefix states and the
        // final states; the kernel is a grid-stride loop over segments × state elements.
        unsafe { b.launch(cfg) }.map_err(driver("launching la_state_scan"))?;
    }
    let mut ptr = Ptrs::new(&stream);
    let mut args = CoreArgs { n_items: n_items as i32, dk: dk as i32, dv: dv as i32, ..Default::default() };
    fill_core_options(&mut args, p);
    args.accumulate = 0;
    args.q = ptr.tensor(a.q)?;
    args.k = ptr.tensor(a.k)?;
    args.v = ptr.tensor(a.v)?;
    args.out = out.ptr(&mut ptr);
    args.items = ptr.of(&items2);
    if p.cfg.causal {
        args.s_in = ptr.of(&prefix_s);
        args.z_in = ptr.of(&prefix_z);
    } else {
        args.s_in = ptr.of(s_out);
        args.z_in = ptr.of(z_out);
    }
    launch_core(dev, a.q.dtype(), &args, n_items, dv, true)
}

fn reference_forward(
    dev: &CudaDevice,
    p: &Problem,
    a: &ForwardArgs<'_>,
    out: &mut Out,
    s_out: &mut CudaSlice<f32>,
    z_out: &mut CudaSlice<f32>,
) -> Result<()> {
    let items = dev.htod(&segment_items(p, a.s0.is_some()))?;
    let stream = dev.stream().clone();
    let mut ptr = Ptrs::new(&stream);
    let mut args =
        CoreArgs { n_items: items.len() as i32, dk: p.dk as i32, dv: p.dv as i32, ..Default::default() };
    fill_core_options(&mut args, p);
    args.q = ptr.tensor(a.q)?;
    args.k = ptr.tensor(a.k)?;
    args.v = ptr.tensor(a.v)?;
    args.out = out.ptr(&mut ptr);
    args.items = ptr.of(&items);
    args.s_in = ptr.opt_tensor(a.s0)?;
    args.z_in = ptr.opt_tensor(a.z0)?;
    args.s_out = ptr.of_mut(s_out);
    args.z_out = ptr.of_mut(z_out);
    if let Some(eta) = p.momentum {
        args.eta = eta;
    }
    let name = format!("la_reference_forward_{}", a.q.dtype().as_str());
    let f = dev.function(MODULE, &name)?;
    let cfg = LaunchConfig {
        grid_dim: (p.segments.len() as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&args);
    // SAFETY: as for the core; one block per segment, every loop bounded by the item's rows.
    unsafe { b.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
    Ok(())
}

/// The unfused quadratic baseline (see `LinearAttention::forward_quadratic`): scores, then
/// output, two launches of 16×16-tiled kernels with a [B·H, T, T] f32 intermediate.
pub(super) fn forward_quadratic(p: &Problem, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    const OP: &str = "LinearAttention::forward_quadratic";
    let dev = q.cuda_device()?;
    let g = QuadraticGrid::of(p, OP)?;
    let fm = p.cfg.feature_map.code();
    let scores = quadratic_scores(dev, &g, (q, k), p.dk, p.cfg.causal, fm)?;
    let out = quadratic_output(
        dev,
        &g,
        &scores,
        v,
        p.dv,
        Product { normalize: p.cfg.normalize, transpose_a: false },
        p,
    )?;
    Ok(out.into_tensor(&output_shape(q, p.dv), q.device()))
}

/// The quadratic baseline's forward and backward as autograd runs them (identity map,
/// unnormalised, the caller checks): A and O as [`forward_quadratic`], then from the saved A,
/// dA = mask(dO·Vᵀ), dV = scale·Aᵀ·dO, dQ = scale·dA·K, dK = scale·dAᵀ·Q. Returns
/// [O, dQ, dK, dV].
pub(super) fn forward_backward_quadratic(
    p: &Problem,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad_output: &Tensor,
) -> Result<[Tensor; 4]> {
    const OP: &str = "LinearAttention::forward_backward_quadratic";
    let dev = q.cuda_device()?;
    let g = QuadraticGrid::of(p, OP)?;
    let identity = super::FeatureMap::Identity.code();
    let plain = Product { normalize: false, transpose_a: false };
    let transposed = Product { normalize: false, transpose_a: true };
    let a = quadratic_scores(dev, &g, (q, k), p.dk, p.cfg.causal, identity)?;
    let o = quadratic_output(dev, &g, &a, v, p.dv, plain, p)?;
    let da = quadratic_scores(dev, &g, (grad_output, v), p.dv, p.cfg.causal, identity)?;
    let dv = quadratic_output(dev, &g, &a, grad_output, p.dv, transposed, p)?;
    let dq = quadratic_output(dev, &g, &da, k, p.dk, plain, p)?;
    let dk = quadratic_output(dev, &g, &da, q, p.dk, transposed, p)?;
    let (qs, vs) = (output_shape(q, p.dk), output_shape(q, p.dv));
    let device = q.device();
    Ok([
        o.into_tensor(&vs, device),
        dq.into_tensor(&qs, device),
        dk.into_tensor(&qs, device),
        dv.into_tensor(&vs, device),
    ])
}

/// q's shape with the last dimension `width`.
fn output_shape(q: &Tensor, width: usize) -> Vec<usize> {
    let mut shape = q.shape().to_vec();
    shape[3] = width;
    shape
}

/// The quadratic kernels' grid: heads on z, 16-row tiles of T on y (and x for scores), each
/// count checked against the grid's limits, and the T × T scores' length.
struct QuadraticGrid {
    heads: u32,
    t: i32,
    row_tiles: u32,
    scores_len: usize,
}

impl QuadraticGrid {
    fn of(p: &Problem, op: &'static str) -> Result<QuadraticGrid> {
        let (heads, t) = (p.segments.len(), p.segments.first().map_or(0, |s| s.len));
        let too_big =
            |what: &str, n: usize| Error::invalid(op, what, format!("{n} is more than the grid allows"));
        Ok(QuadraticGrid {
            heads: u32::try_from(heads).ok().filter(|&h| h <= 65_535).ok_or_else(|| too_big("B·H", heads))?,
            t: i32::try_from(t).map_err(|_| too_big("T", t))?,
            row_tiles: u32::try_from(t.div_ceil(16))
                .ok()
                .filter(|&x| x <= 65_535)
                .ok_or_else(|| too_big("T", t))?,
            scores_len: heads
                .checked_mul(t * t)
                .ok_or_else(|| too_big("B·H·T²", heads.saturating_mul(t * t)))?,
        })
    }
}

/// Two 16 × 17 f32 tiles: the quadratic kernels' shared memory.
const QUADRATIC_SMEM: u32 = 2 * 16 * 17 * 4;

/// `la_quadratic_scores_<dtype>`: per head, mask(φ(X)φ(Y)ᵀ) of X, Y [T, `width`] into a new
/// [heads, T, T] f32 buffer.
fn quadratic_scores(
    dev: &CudaDevice,
    g: &QuadraticGrid,
    (x, y): (&Tensor, &Tensor),
    width: usize,
    causal: bool,
    fm: i32,
) -> Result<CudaSlice<f32>> {
    let mut scores = dev.alloc::<f32>(g.scores_len)?;
    let name = format!("la_quadratic_scores_{}", x.dtype().as_str());
    let f = dev.function(MODULE, &name)?;
    let stream = dev.stream().clone();
    let mut ptr = Ptrs::new(&stream);
    let (xp, yp, ap) = (ptr.tensor(x)?, ptr.tensor(y)?, ptr.of_mut(&mut scores));
    let (width, causal) = (width as i32, causal as i32);
    let mut b = stream.launch_builder(&f);
    b.arg(&xp).arg(&yp).arg(&ap).arg(&g.t).arg(&width).arg(&causal).arg(&fm);
    let cfg = LaunchConfig {
        grid_dim: (g.row_tiles, g.row_tiles, g.heads),
        block_dim: (256, 1, 1),
        shared_mem_bytes: QUADRATIC_SMEM,
    };
    // SAFETY: x, y are [heads·t, width], scores holds heads·t·t floats; the grid covers the
    // t × t tiles of every head and the kernel bounds-checks the last tiles.
    unsafe { b.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
    drop(ptr);
    Ok(scores)
}

/// How `quadratic_output` multiplies: normalised (forward only), or by Aᵀ.
#[derive(Clone, Copy)]
struct Product {
    normalize: bool,
    transpose_a: bool,
}

/// `la_quadratic_output_<dtype>`: per head, scale·A·V (Aᵀ·V when `transpose_a`; divided by
/// rowsum(A) + eps when normalising) of V [T, `width`], into a new output of V's dtype.
fn quadratic_output(
    dev: &CudaDevice,
    g: &QuadraticGrid,
    a: &CudaSlice<f32>,
    v: &Tensor,
    width: usize,
    product: Product,
    p: &Problem,
) -> Result<Out> {
    let mut out = Out::alloc(dev, v.dtype(), p.rows * width)?;
    let name = format!("la_quadratic_output_{}", v.dtype().as_str());
    let f = dev.function(MODULE, &name)?;
    let stream = dev.stream().clone();
    let mut ptr = Ptrs::new(&stream);
    let (ap, vp, op) = (ptr.of(a), ptr.tensor(v)?, out.ptr(&mut ptr));
    let (w, normalize, transpose) = (width as i32, product.normalize as i32, product.transpose_a as i32);
    let mut b = stream.launch_builder(&f);
    b.arg(&ap)
        .arg(&vp)
        .arg(&op)
        .arg(&g.t)
        .arg(&w)
        .arg(&normalize)
        .arg(&p.cfg.scale)
        .arg(&p.cfg.eps)
        .arg(&transpose);
    let cfg = LaunchConfig {
        grid_dim: (width.div_ceil(16) as u32, g.row_tiles, g.heads),
        block_dim: (256, 1, 1),
        shared_mem_bytes: QUADRATIC_SMEM,
    };
    // SAFETY: a holds heads·t·t floats, v and the output [heads·t, width]; the grid covers the
    // t × width tiles of every head and the kernel bounds-checks the last tiles.
    unsafe { b.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
    drop(ptr);
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// backward

pub(super) fn backward(
    p: &Problem,
    a: &ForwardArgs<'_>,
    b: &BackwardArgs<'_>,
    path: KernelPath,
) -> Result<BackwardResult> {
    let dev = a.q.cuda_device()?;
    let dtype = a.q.dtype();
    let (rows, states, dk, dv) = (p.rows, p.states(), p.dk, p.dv);
    let mut dq = Out::alloc(dev, dtype, rows * dk)?;
    let mut dkk = Out::alloc(dev, dtype, rows * dk)?;
    let mut dvv = Out::alloc(dev, dtype, rows * dv)?;
    let mut ds0 = dev.alloc::<f32>(states * dk * dv)?;
    let mut dz0 = dev.alloc::<f32>(states * dk)?;
    let mut outs = Outs { dq: &mut dq, dk: &mut dkk, dv: &mut dvv, ds0: &mut ds0, dz0: &mut dz0 };
    if path == KernelPath::Reference {
        reference_backward(dev, p, a, b, &mut outs)?;
    } else {
        chunked_backward(dev, p, a, b, &mut outs, path != KernelPath::Simt)?;
    }
    let device = a.q.device();
    Ok(BackwardResult {
        dq: dq.into_tensor(a.q.shape(), device),
        dk: dkk.into_tensor(a.k.shape(), device),
        dv: dvv.into_tensor(a.v.shape(), device),
        d_state: Tensor::from_cuda_buffer(CudaBuffer::F32(ds0), &[states, dk, dv], DType::F32, device),
        d_normalizer: Tensor::from_cuda_buffer(CudaBuffer::F32(dz0), &[states, dk], DType::F32, device),
    })
}

struct Outs<'o> {
    dq: &'o mut Out,
    dk: &'o mut Out,
    dv: &'o mut Out,
    ds0: &'o mut CudaSlice<f32>,
    dz0: &'o mut CudaSlice<f32>,
}

fn reference_backward(
    dev: &CudaDevice,
    p: &Problem,
    a: &ForwardArgs<'_>,
    b: &BackwardArgs<'_>,
    o: &mut Outs<'_>,
) -> Result<()> {
    let items = dev.htod(&segment_items(p, a.s0.is_some()))?;
    let mut gp = dev.alloc::<f32>(p.rows * (p.dv + 1))?;
    let stream = dev.stream().clone();
    let mut ptr = Ptrs::new(&stream);
    let mut f =
        CoreArgs { n_items: items.len() as i32, dk: p.dk as i32, dv: p.dv as i32, ..Default::default() };
    fill_core_options(&mut f, p);
    f.q = ptr.tensor(a.q)?;
    f.k = ptr.tensor(a.k)?;
    f.v = ptr.tensor(a.v)?;
    f.items = ptr.of(&items);
    f.s_in = ptr.opt_tensor(a.s0)?;
    f.z_in = ptr.opt_tensor(a.z0)?;
    if let Some(eta) = p.momentum {
        f.eta = eta;
    }
    let args = RefBackwardArgs {
        f,
        grad_out: ptr.tensor(b.grad_output)?,
        gs: ptr.opt_tensor(b.grad_state)?,
        gz: ptr.opt_tensor(b.grad_normalizer)?,
        gp: ptr.of_mut(&mut gp),
        dq: o.dq.ptr(&mut ptr),
        dk: o.dk.ptr(&mut ptr),
        dv: o.dv.ptr(&mut ptr),
        ds0: ptr.of_mut(o.ds0),
        dz0: ptr.of_mut(o.dz0),
    };
    let name = format!("la_reference_backward_{}", a.q.dtype().as_str());
    let func = dev.function(MODULE, &name)?;
    let cfg = LaunchConfig {
        grid_dim: (p.segments.len() as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut lb = stream.launch_builder(&func);
    lb.arg(&args);
    // SAFETY: one block per segment; every buffer is sized for all rows / states.
    unsafe { lb.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
    Ok(())
}

/// The backward in two launches (see the module docs and the .cu file): the prep writes g' to
/// a `[rows, dv + tiles]` scratch, then the three passes run side by side.
fn chunked_backward(
    dev: &CudaDevice,
    p: &Problem,
    a: &ForwardArgs<'_>,
    b: &BackwardArgs<'_>,
    o: &mut Outs<'_>,
    tensor_cores: bool,
) -> Result<()> {
    let dts = a.q.dtype().as_str();
    let (rows, dk, dv) = (p.rows, p.dk, p.dv);
    let n_items = p.segments.len();
    let tiles = dv.div_ceil(TILE);
    // Every pass reads its (possibly null, i.e. zero) initial state.
    let items = dev.htod(&segment_items(p, true))?;
    let mut gp = dev.alloc::<f32>(rows * (dv + tiles))?;
    let stream = dev.stream().clone();
    let mut ptr = Ptrs::new(&stream);
    let args = BwdArgs {
        q: ptr.tensor(a.q)?,
        k: ptr.tensor(a.k)?,
        v: ptr.tensor(a.v)?,
        g: ptr.tensor(b.grad_output)?,
        s0: ptr.opt_tensor(a.s0)?,
        z0: ptr.opt_tensor(a.z0)?,
        gs: ptr.opt_tensor(b.grad_state)?,
        gz: ptr.opt_tensor(b.grad_normalizer)?,
        gp: ptr.of_mut(&mut gp),
        grad_q: o.dq.ptr(&mut ptr),
        grad_k: o.dk.ptr(&mut ptr),
        grad_v: o.dv.ptr(&mut ptr),
        ds0: ptr.of_mut(o.ds0),
        dz0: ptr.of_mut(o.dz0),
        items: ptr.of(&items),
        n_items: n_items as i32,
        dk: dk as i32,
        dv: dv as i32,
        tiles: tiles as i32,
        fm: p.cfg.feature_map.code(),
        causal: p.cfg.causal as i32,
        normalize: p.cfg.normalize as i32,
        scale: p.cfg.scale,
        eps: p.cfg.eps,
        eta: p.momentum.unwrap_or(-1.0),
    };
    // Tensor cores for 16-bit inputs; the momentum's reverse sum lives in the SIMT core only.
    let mma = tensor_cores && matches!(a.q.dtype(), DType::F16 | DType::BF16) && p.momentum.is_none();
    let kind = if mma { "mma_" } else { "" };
    // 1. The forward recomputed, g' written instead of o; its chunk follows Dk.
    let c = chunk_for(dk);
    let smem = if mma { mma_smem_bytes(c, dk) } else { core_smem_bytes(c, dk) };
    let cfg = core_grid(n_items, tiles, 1, smem)?;
    launch_backward(dev, &format!("la_backward_prep_{kind}{dts}_c{c}"), &args, cfg)?;
    // 2. The three passes, of widths (dv+1) × dk, (dv+1) × dk and dk × (dv+1): chunk and
    //    shared memory follow the wider key width, the grid the most v tiles of any pass.
    let wide = dk.max(dv + 1);
    let c = chunk_for(wide);
    let tiles = dk.div_ceil(TILE).max((dv + 1).div_ceil(TILE));
    let cfg = core_grid(n_items, tiles, 3, passes_smem_bytes(mma, p.cfg.normalize, dk, dv))?;
    launch_backward(dev, &format!("la_backward_passes_{kind}{dts}_c{c}"), &args, cfg)
}

/// Dynamic shared memory of the backward's passes launch: the plan of the wider key width,
/// dk or dv + 1. The tensor-core passes run a normalised dφ(q) on the SIMT core in the same
/// launch (see the .cu file), so they get the larger of the two plans.
fn passes_smem_bytes(mma: bool, normalize: bool, dk: usize, dv: usize) -> usize {
    let wide = dk.max(dv + 1);
    let c = chunk_for(wide);
    match (mma, normalize) {
        (false, _) => core_smem_bytes(c, wide),
        (true, false) => mma_smem_bytes(c, wide),
        (true, true) => mma_smem_bytes(c, wide).max(core_smem_bytes(c, wide)),
    }
}

fn launch_backward(dev: &CudaDevice, name: &str, args: &BwdArgs, cfg: LaunchConfig) -> Result<()> {
    let f = dev.function(MODULE, name)?;
    dev.allow_shared_bytes(&f, name, cfg.shared_mem_bytes as usize)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(args);
    // SAFETY: the pointers in `args` address live buffers sized for all rows and states (the
    // caller's tensors, the outputs, and gp of rows × (dv + tiles)); the struct mirrors BwdArgs;
    // the grid covers items × v tiles (× passes) and the shared memory is the core's plan for
    // the widest pass.
    unsafe { b.launch(cfg) }.map_err(driver(format!("launching {name}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        cheapest_groups, chunk_for, core_kernel, core_smem_bytes, mma_smem_bytes, passes_smem_bytes, CoreArgs,
    };
    use crate::DType;

    /// The most dynamic shared memory an sm_80 block may opt into (163 KiB; sm_90: 227 KiB).
    const SM80_OPTIN: usize = 163 * 1024;

    /// Every launch's shared memory at every head width the API accepts (1..=256) fits an sm_80
    /// block: the forward (SIMT and tensor-core), the backward's prep and its passes (key widths
    /// up to Dv + 1 = 257, the mixed SIMT/tensor-core launch taking the larger plan). A plan
    /// past the limit would be refused by `allow_shared_bytes` on the GPU, not caught on the CPU.
    #[test]
    fn shared_memory_fits_sm80_at_every_width() {
        for dk in 1..=256usize {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for eta in [-1.0f32, 0.5] {
                    let args = CoreArgs { dk: dk as i32, eta, ..CoreArgs::default() };
                    let (name, smem) = core_kernel(dtype, &args, true);
                    assert!(smem <= SM80_OPTIN, "{name} at Dk {dk}: {smem} bytes");
                }
            }
            let c = chunk_for(dk);
            assert!(mma_smem_bytes(c, dk).max(core_smem_bytes(c, dk)) <= SM80_OPTIN, "prep at Dk {dk}");
            for dv in 1..=256usize {
                for (mma, normalize) in [(false, false), (false, true), (true, false), (true, true)] {
                    let smem = passes_smem_bytes(mma, normalize, dk, dv);
                    assert!(
                        smem <= SM80_OPTIN,
                        "passes mma={mma} normalize={normalize} Dk {dk} Dv {dv}: {smem}"
                    );
                }
            }
        }
        // The widest: the mixed passes launch at key width 257 (padded to 272) in 32-row chunks.
        assert_eq!(passes_smem_bytes(true, true, 256, 256), mma_smem_bytes(32, 257));
        assert_eq!(mma_smem_bytes(32, 257), 163_552);
    }

    /// The tensor-core plan mirrors `SmemMma` in the .cu file: halves (q, k, v, A, the 16-bit
    /// state) with rows padded by 8, then, 16-byte aligned, the f32 state, z, dens, the two
    /// column groups' shares of dens, the warps' maxima of |S| (f16), and o.
    #[test]
    fn mma_plan_by_hand() {
        // C = 64, Dk = 64: ldq = 72, ldt = 72; halves 2·64·72 + 2·64·72 + 64·72 = 23040 (46080
        // bytes), floats 64·64 + 64 + 64 + 128 + 8 + 64·64 = 8456 (33824 bytes).
        assert_eq!(mma_smem_bytes(64, 64), 46_080 + 33_824);
        // Dk = 6 pads to 16: halves 2·64·24 + 2·64·72 + 16·72 = 13440 (26880 bytes), floats
        // 16·64 + 16 + 64 + 128 + 8 + 64·64 = 5336 (21344 bytes).
        assert_eq!(mma_smem_bytes(64, 6), 26_880 + 21_344);
    }

    /// H200: 132 SMs; the tensor-core core runs one 256-thread block per SM.
    const WAVE: usize = 132;

    #[test]
    fn few_long_sequences_split() {
        // (1,8,4096,64) bf16: 8 blocks on 132 SMs, 64 chunks each; a group's state trips are
        // 3·64·64 floats against 4096·256 halves of traffic.
        let g = cheapest_groups(8, WAVE, 64, true, 0.023);
        assert!((8..=64).contains(&g), "{g} groups");
        assert!(g * 8 <= 2 * WAVE, "at most two waves: {g} groups");
    }

    #[test]
    fn a_nearly_full_wave_stays_fused() {
        // (4,16,2048,128): 64 items × 2 v tiles = 128 blocks, 97% of a wave: a split would
        // re-read k and v to fill the last 4 SMs.
        for overhead in [0.0, 0.05] {
            assert_eq!(cheapest_groups(128, WAVE, 32, true, overhead), 1);
            assert_eq!(cheapest_groups(128, WAVE, 32, false, overhead), 1);
            assert_eq!(cheapest_groups(WAVE, WAVE, 32, true, overhead), 1);
            assert_eq!(cheapest_groups(10 * WAVE, WAVE, 32, true, overhead), 1);
        }
    }

    #[test]
    fn half_a_wave_splits_while_the_state_trips_are_cheap() {
        // 64 blocks: two groups fill one wave with half a sequence plus its state pass each
        // (0.75 + overhead against 1.0 fused).
        assert_eq!(cheapest_groups(64, WAVE, 32, true, 0.02), 2);
        assert_eq!(cheapest_groups(64, WAVE, 32, true, 0.3), 1);
        // A quarter of a wave: splitting wins.
        assert!(cheapest_groups(32, WAVE, 32, true, 0.02) > 1);
    }

    #[test]
    fn the_issues_shapes() {
        // (8,8,1024,64) bf16: 64 blocks, half a wave; a group's state trips 3·64·64 floats
        // against 1024·256 halves: two groups fill the wave.
        assert_eq!(cheapest_groups(64, WAVE, 16, true, 0.094), 2);
        // (2,8,2048,256), the benchmark's wide shape: 16 items × 4 v tiles.
        assert_eq!(cheapest_groups(64, WAVE, 32, true, 0.075), 2);
    }

    #[test]
    fn degenerate_inputs_never_panic() {
        for blocks in [0, 1, 7, 1 << 20, 1 << 40] {
            for per_wave in [0, 1, WAVE] {
                for max_chunks in [0, 1, 2, 5, 1 << 20] {
                    for causal in [true, false] {
                        let g = cheapest_groups(blocks, per_wave, max_chunks, causal, 0.05);
                        assert!(g >= 1 && (g == 1 || g <= max_chunks), "{g} groups");
                    }
                }
            }
        }
    }

    #[test]
    fn groups_never_exceed_the_chunks() {
        for chunks in 1..8 {
            let g = cheapest_groups(1, WAVE, chunks, true, 0.0);
            assert!(g <= chunks.max(1), "{g} groups for {chunks} chunks");
        }
    }
}
