//! [`Tensor`]: an immutable, contiguous, row-major array on one device.

use std::any::Any;
use std::sync::Arc;

use half::{bf16, f16};

use crate::cpu::zeroed_vec;
use crate::device::Kind;
use crate::{DType, Device, Element, Error, Result};

/// An immutable n-dimensional array, contiguous and row-major, on the CPU or a CUDA device.
///
/// Tensors are values: operations return new tensors and never modify their inputs. Cloning is
/// cheap (the storage is shared).
///
/// ```
/// use metakernels::{DType, Device, Tensor};
/// # fn main() -> metakernels::Result<()> {
/// let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &Device::cpu())?;
/// assert_eq!(t.shape(), &[2, 3]);
/// let h = t.to_dtype(DType::BF16)?;
/// assert_eq!(h.to_vec::<half::bf16>()?[5].to_f32(), 6.0);
/// assert!(t.to_vec::<f64>().is_err()); // the element type must match the dtype
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Arc<[usize]>,
    dtype: DType,
    device: Device,
}

/// Where the elements are. Typed enums, so that every access is checked by dtype.
pub(crate) enum Storage {
    Cpu(HostBuffer),
    #[cfg(feature = "cuda")]
    Cuda(CudaBuffer),
}

/// Defines a typed buffer enum over the five dtypes, with a checked downcast to `C<T>`.
macro_rules! typed_buffer {
    ($(#[$meta:meta])* $name:ident, $container:ident) => {
        $(#[$meta])*
        pub(crate) enum $name {
            F32($container<f32>),
            F64($container<f64>),
            F16($container<f16>),
            BF16($container<bf16>),
            U32($container<u32>),
        }

        impl $name {
            /// The buffer as `C<T>`, or `None` when `T` is not its element type.
            pub(crate) fn downcast<T: Element>(&self) -> Option<&$container<T>> {
                let any: &dyn Any = match self {
                    $name::F32(b) => b,
                    $name::F64(b) => b,
                    $name::F16(b) => b,
                    $name::BF16(b) => b,
                    $name::U32(b) => b,
                };
                any.downcast_ref()
            }

            /// Wraps a `C<T>` in the variant of `T`'s dtype.
            pub(crate) fn wrap<T: Element>(buffer: $container<T>) -> Self {
                let any: Box<dyn Any> = Box::new(buffer);
                // Each arm downcasts to the type the match proved `T` to be, so none can fail;
                // Element is sealed to exactly these five types.
                let any = match any.downcast::<$container<f32>>() {
                    Ok(b) => return $name::F32(*b),
                    Err(a) => a,
                };
                let any = match any.downcast::<$container<f64>>() {
                    Ok(b) => return $name::F64(*b),
                    Err(a) => a,
                };
                let any = match any.downcast::<$container<f16>>() {
                    Ok(b) => return $name::F16(*b),
                    Err(a) => a,
                };
                let any = match any.downcast::<$container<bf16>>() {
                    Ok(b) => return $name::BF16(*b),
                    Err(a) => a,
                };
                match any.downcast::<$container<u32>>() {
                    Ok(b) => $name::U32(*b),
                    Err(_) => unreachable!("Element is sealed to five types"), // invariant: sealed trait
                }
            }
        }
    };
}

typed_buffer!(
    /// Host memory.
    HostBuffer,
    Vec
);

#[cfg(feature = "cuda")]
use crate::cuda::CudaSlice;
#[cfg(feature = "cuda")]
typed_buffer!(
    /// Device memory. Holds at least one element even for empty tensors (the driver rejects
    /// empty allocations); the tensor's shape is the truth about its length.
    CudaBuffer,
    CudaSlice
);

/// The element count of a tensor's own shape, checked when the tensor was made (so never
/// `None` here; a zero dimension beside a huge one is 0, not an overflow).
fn numel_of(shape: &[usize]) -> usize {
    checked_numel(shape).unwrap_or(0)
}

/// The element count of a requested shape, or `None` when it overflows usize (a zero dimension
/// makes it 0 whatever the others).
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The error for a requested shape whose element count overflows usize.
fn overflowing_shape(op: &'static str, shape: &[usize]) -> Error {
    Error::invalid(op, "shape", format!("{shape:?} overflows usize elements"))
}

impl Tensor {
    // ----- construction -------------------------------------------------------------------

    /// A tensor holding a copy of `data`, laid out row-major with `shape`, on `device`.
    ///
    /// Errors with [`Error::LengthMismatch`] when `data.len()` is not the product of `shape`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize], device: &Device) -> Result<Tensor> {
        check_len(shape, data.len())?;
        match &device.0 {
            Kind::Cpu => Ok(Tensor::from_host_vec(data.to_vec(), shape)),
            #[cfg(feature = "cuda")]
            Kind::Cuda(d) => {
                Ok(Tensor::from_cuda_buffer(CudaBuffer::wrap(d.htod(data)?), shape, T::DTYPE, device))
            }
        }
    }

    /// Like [`Tensor::from_slice`], taking ownership (no copy on the CPU).
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Tensor> {
        check_len(shape, data.len())?;
        match &device.0 {
            Kind::Cpu => Ok(Tensor::from_host_vec(data, shape)),
            #[cfg(feature = "cuda")]
            Kind::Cuda(_) => Tensor::from_slice(&data, shape, device),
        }
    }

    /// A tensor of zeros.
    ///
    /// Errors when the element count overflows usize, and with [`Error::OutOfMemory`] when the
    /// device (or the host) cannot hold it.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = checked_numel(shape).ok_or_else(|| overflowing_shape("Tensor::zeros", shape))?;
        match &device.0 {
            Kind::Cpu => Ok(match dtype {
                // calloc'd: no fill pass (f16/bf16's vec![ZERO; n] was a serial one).
                DType::F32 => Tensor::from_host_vec(zeroed_vec::<f32>(n)?, shape),
                DType::F64 => Tensor::from_host_vec(zeroed_vec::<f64>(n)?, shape),
                DType::F16 => Tensor::from_host_vec(zeroed_vec::<f16>(n)?, shape),
                DType::BF16 => Tensor::from_host_vec(zeroed_vec::<bf16>(n)?, shape),
                DType::U32 => Tensor::from_host_vec(zeroed_vec::<u32>(n)?, shape),
            }),
            #[cfg(feature = "cuda")]
            Kind::Cuda(d) => {
                let buffer = match dtype {
                    DType::F32 => CudaBuffer::F32(d.alloc_zeros(n)?),
                    DType::F64 => CudaBuffer::F64(d.alloc_zeros(n)?),
                    DType::F16 => CudaBuffer::F16(d.alloc_zeros(n)?),
                    DType::BF16 => CudaBuffer::BF16(d.alloc_zeros(n)?),
                    DType::U32 => CudaBuffer::U32(d.alloc_zeros(n)?),
                };
                Ok(Tensor::from_cuda_buffer(buffer, shape, dtype, device))
            }
        }
    }

    pub(crate) fn from_host_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Tensor {
        Tensor {
            storage: Arc::new(Storage::Cpu(HostBuffer::wrap(data))),
            shape: shape.into(),
            dtype: T::DTYPE,
            device: Device::cpu(),
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn from_cuda_buffer(
        buffer: CudaBuffer,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Tensor {
        Tensor {
            storage: Arc::new(Storage::Cuda(buffer)),
            shape: shape.into(),
            dtype,
            device: device.clone(),
        }
    }

    /// Wraps a device buffer that a caller already holds, without copying.
    ///
    /// The buffer's length must equal the product of `shape`, and it must belong to `device`.
    /// Work of this crate runs on the device's own stream; cudarc's event tracking orders it
    /// after work the caller queued on the buffer's stream.
    #[cfg(feature = "cuda")]
    pub fn from_cuda_slice<T: Element>(
        slice: cudarc::driver::CudaSlice<T>,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        check_len(shape, slice.len())?;
        let Kind::Cuda(d) = &device.0 else {
            return Err(Error::DeviceMismatch {
                op: "Tensor::from_cuda_slice",
                expected: "a CUDA device".into(),
                got: device.to_string(),
            });
        };
        if slice.ordinal() != d.ordinal() {
            return Err(Error::DeviceMismatch {
                op: "Tensor::from_cuda_slice",
                expected: device.to_string(),
                got: format!("cuda:{}", slice.ordinal()),
            });
        }
        if slice.is_empty() {
            // Keep the invariant that a CUDA buffer holds at least one element.
            return Tensor::zeros(shape, T::DTYPE, device);
        }
        Ok(Tensor::from_cuda_buffer(CudaBuffer::wrap(slice), shape, T::DTYPE, device))
    }

    /// The device buffer of a CUDA tensor, without copying.
    ///
    /// Errors when the tensor is on the CPU or `T` is not its element type. The slice of an
    /// empty tensor holds one unused element.
    #[cfg(feature = "cuda")]
    pub fn as_cuda_slice<T: Element>(&self) -> Result<&cudarc::driver::CudaSlice<T>> {
        self.cuda_slice::<T>("Tensor::as_cuda_slice")
    }

    // ----- metadata -----------------------------------------------------------------------

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the elements live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The number of elements (the product of the shape; 1 for a rank-0 tensor).
    pub fn numel(&self) -> usize {
        numel_of(&self.shape)
    }

    /// The same elements seen with another shape of equal element count (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if checked_numel(shape) != Some(self.numel()) {
            return Err(Error::shape(
                "Tensor::reshape",
                format!("target shape {shape:?}"),
                format!("a shape of {} elements, like {:?}", self.numel(), self.shape()),
                shape,
            ));
        }
        Ok(Tensor { shape: shape.into(), ..self.clone() })
    }

    // ----- moving data --------------------------------------------------------------------

    /// Copies the elements to a host `Vec<T>`; `T` must be the tensor's element type.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.expect_dtype(T::DTYPE, "Tensor::to_vec", "the tensor")?;
        match &*self.storage {
            Storage::Cpu(b) => {
                b.downcast::<T>().map(|v| v.to_vec()).ok_or_else(|| dtype_bug("Tensor::to_vec"))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                let d = self.cuda_device()?;
                d.dtoh(self.cuda_slice::<T>("Tensor::to_vec")?, self.numel())
            }
        }
    }

    /// The same elements on `device` (a cheap clone when already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device.same_as(device) {
            return Ok(self.clone());
        }
        macro_rules! move_as {
            ($t:ty) => {{
                let host = self.to_vec::<$t>()?;
                Tensor::from_vec(host, &self.shape, device)
            }};
        }
        match self.dtype {
            DType::F32 => move_as!(f32),
            DType::F64 => move_as!(f64),
            DType::F16 => move_as!(f16),
            DType::BF16 => move_as!(bf16),
            DType::U32 => move_as!(u32),
        }
    }

    /// The elements converted to `dtype` (round to nearest even), on the same device.
    ///
    /// Any pair of float dtypes converts; `u32` converts only to itself. On CUDA this runs the
    /// vectorised kernels of `kernels/cast.cu`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        crate::ops::cast::cast(self, dtype)
    }

    // ----- crate-internal access for the ops ----------------------------------------------

    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Errors with [`Error::DTypeMismatch`] unless the dtype is `expected`.
    pub(crate) fn expect_dtype(&self, expected: DType, op: &'static str, what: &str) -> Result<()> {
        if self.dtype == expected {
            Ok(())
        } else {
            Err(Error::DTypeMismatch { op, what: what.into(), expected, got: self.dtype })
        }
    }

    /// The host elements of a CPU tensor of element type `T`.
    pub(crate) fn host_slice<T: Element>(&self, op: &'static str) -> Result<&[T]> {
        self.expect_dtype(T::DTYPE, op, "tensor")?;
        match &*self.storage {
            Storage::Cpu(b) => b.downcast::<T>().map(|v| v.as_slice()).ok_or_else(|| dtype_bug(op)),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                Err(Error::DeviceMismatch { op, expected: "cpu".into(), got: self.device.to_string() })
            }
        }
    }

    /// The elements of a CPU float tensor as f32 (converted for f16/bf16/f64; shared for f32).
    pub(crate) fn host_f32(&self, op: &'static str) -> Result<std::borrow::Cow<'_, [f32]>> {
        use half::slice::HalfFloatSliceExt;
        use std::borrow::Cow;
        match self.dtype {
            DType::F32 => self.host_slice::<f32>(op).map(Cow::Borrowed),
            DType::F64 => Ok(Cow::Owned(self.host_slice::<f64>(op)?.iter().map(|&x| x as f32).collect())),
            DType::F16 => Ok(Cow::Owned(self.host_slice::<f16>(op)?.to_f32_vec())),
            DType::BF16 => Ok(Cow::Owned(self.host_slice::<bf16>(op)?.to_f32_vec())),
            DType::U32 => {
                Err(Error::UnsupportedDType { op, dtype: DType::U32, supported: "f32, f64, f16, bf16" })
            }
        }
    }

    /// The device buffer of a CUDA tensor of element type `T`.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_slice<T: Element>(&self, op: &'static str) -> Result<&CudaSlice<T>> {
        self.expect_dtype(T::DTYPE, op, "tensor")?;
        match &*self.storage {
            Storage::Cuda(b) => b.downcast::<T>().ok_or_else(|| dtype_bug(op)),
            Storage::Cpu(_) => {
                Err(Error::DeviceMismatch { op, expected: "a CUDA device".into(), got: "cpu".into() })
            }
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_device(&self) -> Result<&crate::cuda::CudaDevice> {
        match &self.device.0 {
            Kind::Cuda(d) => Ok(d),
            Kind::Cpu => {
                Err(Error::DeviceMismatch { op: "cuda", expected: "a CUDA device".into(), got: "cpu".into() })
            }
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape(), self.dtype, self.device)
    }
}

fn check_len(shape: &[usize], len: usize) -> Result<()> {
    match checked_numel(shape) {
        Some(n) if n == len => Ok(()),
        Some(n) => Err(Error::LengthMismatch { shape: shape.to_vec(), expected: n, got: len }),
        None => Err(overflowing_shape("Tensor", shape)),
    }
}

/// The dtype tag and the buffer variant disagree: impossible by construction, but reported as
/// an error rather than a panic.
fn dtype_bug(op: &'static str) -> Error {
    Error::invalid(op, "tensor storage", "dtype tag and buffer disagree (a metakernels bug; please report)")
}
