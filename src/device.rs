//! Where tensors live and kernels run: [`Device`].

use crate::{Error, Result};

/// A compute device: the CPU, or one CUDA GPU.
///
/// Cheap to clone; clones of a CUDA device share one context, one stream and one module cache.
/// `Send + Sync`: a device may be used from several threads at once.
///
/// ```
/// use metakernels::Device;
/// let dev = Device::best(); // CUDA 0 when usable, else the CPU; never panics
/// println!("running on {dev}");
/// assert!(Device::cpu().is_cpu());
/// ```
#[derive(Clone)]
pub struct Device(pub(crate) Kind);

#[derive(Clone)]
pub(crate) enum Kind {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaDevice),
}

impl Device {
    /// The host CPU (the rayon thread pool).
    pub fn cpu() -> Device {
        Device(Kind::Cpu)
    }

    /// CUDA device `ordinal`.
    ///
    /// Errors with [`Error::CudaUnavailable`] when the crate was built without the `cuda`
    /// feature, when no CUDA driver (libcuda) is installed, or when `ordinal` is not below the
    /// number of devices. Never panics.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            crate::cuda::CudaDevice::get(ordinal).map(|d| Device(Kind::Cuda(d)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::CudaUnavailable { reason: "metakernels was built without its `cuda` feature".into() })
        }
    }

    /// CUDA device 0 when it can be used (driver present, device present, kernels built into
    /// this binary), else the CPU. Never panics.
    pub fn best() -> Device {
        #[cfg(feature = "cuda")]
        if crate::cuda::kernels_built() {
            if let Ok(dev) = Device::cuda(0) {
                return dev;
            }
        }
        Device::cpu()
    }

    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self.0, Kind::Cpu)
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        !self.is_cpu()
    }

    /// The CUDA ordinal, or `None` for the CPU.
    pub fn ordinal(&self) -> Option<usize> {
        match &self.0 {
            Kind::Cpu => None,
            #[cfg(feature = "cuda")]
            Kind::Cuda(d) => Some(d.ordinal()),
        }
    }

    /// A human-readable name: `cpu`, or the GPU's name as the driver reports it.
    pub fn name(&self) -> String {
        match &self.0 {
            Kind::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Kind::Cuda(d) => d.name().to_string(),
        }
    }

    /// Waits until all work queued on this device has finished (a no-op on the CPU, whose
    /// operations are synchronous).
    pub fn synchronize(&self) -> Result<()> {
        match &self.0 {
            Kind::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Kind::Cuda(d) => d.synchronize(),
        }
    }

    /// Runs `f` and returns how long the work it queued took, in milliseconds: measured with
    /// CUDA events on the device's stream for a GPU, with the wall clock on the CPU.
    ///
    /// This is how the benchmarks time kernels; any error from `f` is returned.
    pub fn time_ms<F: FnOnce() -> Result<()>>(&self, f: F) -> Result<f64> {
        match &self.0 {
            Kind::Cpu => {
                let start = std::time::Instant::now();
                f()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            }
            #[cfg(feature = "cuda")]
            Kind::Cuda(d) => d.time_ms(f),
        }
    }

    /// Whether two handles name the same device (CPU == CPU; CUDA by ordinal).
    pub fn same_as(&self, other: &Device) -> bool {
        self.ordinal() == other.ordinal()
    }

    /// Checks that `other` is the same device, else [`Error::DeviceMismatch`] naming `op`.
    pub(crate) fn expect_same(&self, other: &Device, op: &'static str) -> Result<()> {
        if self.same_as(other) {
            Ok(())
        } else {
            Err(Error::DeviceMismatch { op, expected: self.to_string(), got: other.to_string() })
        }
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        self.same_as(other)
    }
}

impl Eq for Device {}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ordinal() {
            None => f.write_str("cpu"),
            Some(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({self})")
    }
}

impl Default for Device {
    /// The CPU: a default that never touches a driver.
    fn default() -> Self {
        Device::cpu()
    }
}
