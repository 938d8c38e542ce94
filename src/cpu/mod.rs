//! Shared CPU building blocks for the families' fallbacks: a checked GEMM over the
//! `matrixmultiply` crate (cache-blocked, SIMD microkernels), used wherever CPU work is
//! matmul-shaped; `multiversion!` for loops that want the CPU's widest vectors; `output_vec`,
//! the allocation of every CPU output; and (`math`) exponentials that vectorise.

pub(crate) mod math;

use crate::{Error, Result};

/// A row-major matrix view: `rows × cols` elements of `data`, row stride `ld` (≥ cols), or its
/// transpose when `transposed` (then `data` is `cols × rows` with row stride `ld`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub transposed: bool,
}

impl<'a, T> Mat<'a, T> {
    /// A dense row-major `rows × cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, ld: cols, transposed: false }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Mat { rows: self.cols, cols: self.rows, transposed: !self.transposed, ..self }
    }

    /// (row stride, column stride) of the logical matrix, in elements.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.ld as isize)
        } else {
            (self.ld as isize, 1)
        }
    }

    /// Whether every element the view addresses lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let (stored_rows, stored_cols) =
            if self.transposed { (self.cols, self.rows) } else { (self.rows, self.cols) };
        stored_cols <= self.ld && (stored_rows - 1) * self.ld + stored_cols <= self.data.len()
    }
}

/// Checks the shapes of C = A·B (C dense row-major `a.rows × b.cols`, row stride `ldc`) and
/// returns the strides to hand to matrixmultiply, or `None` if a view is out of bounds.
fn gemm_strides<T>(a: &Mat<'_, T>, b: &Mat<'_, T>, c_len: usize, ldc: usize) -> Option<[isize; 4]> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let c_ok = m == 0 || n == 0 || (n <= ldc && (m - 1) * ldc + n <= c_len);
    if b.rows != k || !a.in_bounds() || !b.in_bounds() || !c_ok {
        return None;
    }
    let ((rsa, csa), (rsb, csb)) = (a.strides(), b.strides());
    Some([rsa, csa, rsb, csb])
}

/// Defines a checked GEMM over one matrixmultiply routine.
macro_rules! checked_gemm {
    ($(#[$doc:meta])* $name:ident, $t:ty, $kernel:path) => {
        $(#[$doc])*
        pub(crate) fn $name(alpha: $t, a: Mat<'_, $t>, b: Mat<'_, $t>, beta: $t, c: &mut [$t], ldc: usize) -> bool {
            let Some([rsa, csa, rsb, csb]) = gemm_strides(&a, &b, c.len(), ldc) else { return false };
            let (m, k, n) = (a.rows, a.cols, b.cols);
            if m == 0 || n == 0 {
                return true;
            }
            // SAFETY: `gemm_strides` checked that every index the strides produce lies inside
            // the slices; `c` is borrowed mutably and cannot alias `a` or `b`.
            unsafe {
                $kernel(
                    m, k, n, alpha, a.data.as_ptr(), rsa, csa, b.data.as_ptr(), rsb, csb, beta,
                    c.as_mut_ptr(), ldc as isize, 1,
                );
            }
            true
        }
    };
}

checked_gemm!(
    /// C = alpha · A·B + beta · C for f32, with C dense row-major `a.rows × b.cols` (row stride
    /// `ldc`). Single-threaded: callers parallelise over independent products with rayon.
    ///
    /// Returns `false` (and computes nothing) if the shapes disagree or a view is out of bounds,
    /// so a caller's bug cannot become out-of-bounds memory access.
    sgemm,
    f32,
    matrixmultiply::sgemm
);

checked_gemm!(
    /// The f64 counterpart of [`sgemm`].
    dgemm,
    f64,
    matrixmultiply::dgemm
);

/// Defines `fn $name<generics>(args) -> ret` whose body runs compiled for AVX-512 or AVX2 + FMA
/// when the CPU has them (detected at run time, cached by std), else for the baseline target:
/// elementwise loops (exponentials, feature maps, softmax rows, activations) then use 16- or
/// 8-lane vectors where the crate's default x86-64 target allows SSE's 4. Whatever the body calls
/// must be `#[inline(always)]` to be compiled inside each variant.
macro_rules! multiversion {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident $(<$($g:ident: $bound:path),* $(,)?>)? ($($arg:ident: $ty:ty),* $(,)?)
            $(-> $ret:ty)? $body:block
    ) => {
        $(#[$attr])*
        $vis fn $name $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    generic $(::<$($g),*>)? ($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    generic $(::<$($g),*>)? ($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { avx512 $(::<$($g),*>)? ($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2 $(::<$($g),*>)? ($($arg),*) };
                }
            }
            generic $(::<$($g),*>)? ($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// A host output buffer of `len` elements: zeros, or all-ones bytes while poisoning is on
/// (`testing::set_poisoning`). CPU kernels that write every element allocate their outputs with
/// this. The zeros come from the allocator (calloc: fresh pages, zeroed by the OS as the kernel's
/// threads first touch them), not from a fill loop, which for f16/bf16 was a serial pass over the
/// whole output.
///
/// Errors with [`Error::OutOfMemory`] instead of aborting the process when the allocator refuses:
/// an output's size can come from a parameter (K clusters) or from a dimension beside a zero one
/// (`[0, 2⁴⁰]` holds no data), so no input bounds it.
pub fn output_vec<T: crate::Element>(len: usize) -> Result<Vec<T>> {
    if crate::testing::poisoning() {
        let mut v = vec_with_capacity(len)?;
        v.resize(len, bytemuck::cast_slice::<u8, T>(&[0xFFu8; 8][..size_of::<T>()])[0]);
        Ok(v)
    } else {
        let mut v = zeroed_vec(len)?;
        advise_huge_pages(&mut v);
        Ok(v)
    }
}

/// An empty vector with room for `len` elements, or [`Error::OutOfMemory`]: for host scratch
/// whose length no input bounds.
pub(crate) fn vec_with_capacity<T>(len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| host_out_of_memory::<T>(len))?;
    Ok(v)
}

/// `len` zeros from `alloc_zeroed` (calloc), or [`Error::OutOfMemory`]: `bytemuck::zeroed_vec`
/// without its abort on a refused allocation.
pub(crate) fn zeroed_vec<T: bytemuck::Zeroable>(len: usize) -> Result<Vec<T>> {
    let Ok(layout) = std::alloc::Layout::array::<T>(len) else {
        return Err(host_out_of_memory::<T>(len));
    };
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the layout's size is non-zero.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(host_out_of_memory::<T>(len));
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `len` T's (the layout
    // `Vec` frees with), and all-zero bytes are a valid T (`Zeroable`).
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// The host refused `len` elements of `T` (or their size overflows usize).
fn host_out_of_memory<T>(len: usize) -> Error {
    host_refuses(len.saturating_mul(size_of::<T>()))
}

fn host_refuses(requested_bytes: usize) -> Error {
    Error::OutOfMemory {
        requested_bytes,
        free_bytes: host_available_bytes().unwrap_or(0),
        device: "cpu".into(),
    }
}

/// Refuses up front, with [`Error::OutOfMemory`], working memory of `bytes` (`None`: more than
/// usize counts) that the host does not have available, for scratch that many threads allocate
/// at once and whose size no input bounds (an n × n Gram matrix of a wide least-squares system).
/// Where the host does not say what it has available, only an overflow is refused.
pub(crate) fn check_host_memory(bytes: Option<usize>) -> Result<()> {
    match (bytes, host_available_bytes()) {
        (None, _) => Err(host_refuses(usize::MAX)),
        (Some(b), Some(available)) if b > available => Err(host_refuses(b)),
        _ => Ok(()),
    }
}

/// MemAvailable of /proc/meminfo (Linux), in bytes.
pub(crate) fn host_available_bytes() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find_map(|line| line.strip_prefix("MemAvailable:"))?;
    let kib = line.trim().trim_end_matches("kB").trim().parse::<usize>().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Asks Linux to back a large, untouched output with transparent huge pages (where THP is in
/// its `madvise` mode): the first touches then fault in 2 MiB at a time instead of 4 KiB, and
/// for a fresh output of hundreds of MiB the 4 KiB faults were most of a gather's time.
/// Advisory only: the contents and the allocation are unchanged either way.
fn advise_huge_pages<T>(v: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (base, bytes) = (v.as_mut_ptr() as usize, size_of_val(v));
        if bytes < 8 * HUGE {
            return;
        }
        let (start, end) = (base.next_multiple_of(HUGE), (base + bytes) / HUGE * HUGE);
        // SAFETY: [start, end) lies inside `v`'s allocation; MADV_HUGEPAGE only changes how the
        // kernel backs those pages, never what they hold, and its failure is harmless.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_naive_with_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // stored n×k
        let mut c = vec![1.0f32; m * n];
        assert!(sgemm(2.0, Mat::new(&a, m, k), Mat::new(&bt, n, k).t(), 0.5, &mut c, n));
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum();
                assert!((c[i * n + j] - (2.0 * dot + 0.5)).abs() < 1e-5);
            }
        }
        assert!(
            !sgemm(1.0, Mat::new(&a, m, k), Mat::new(&bt, n, k), 0.0, &mut c, n),
            "k mismatch must be refused"
        );
    }

    /// The huge-page advice leaves a large zeroed buffer zeroed and writable, edges included.
    #[test]
    fn huge_page_advice_keeps_contents() {
        let mut v: Vec<f32> = bytemuck::zeroed_vec((40 << 20) / 4 + 3);
        advise_huge_pages(&mut v);
        assert!(v.iter().all(|&x| x == 0.0));
        let n = v.len();
        for i in [0, 1, n / 2, n - 1] {
            v[i] = i as f32;
        }
        assert_eq!((v[0], v[1], v[n / 2], v[n - 1]), (0.0, 1.0, (n / 2) as f32, (n - 1) as f32));
        let mut small = [1.0f32; 3];
        advise_huge_pages(&mut small);
        assert_eq!(small, [1.0; 3]);
    }
}
