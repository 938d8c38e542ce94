//! Element types: the [`DType`] tag and the [`Element`] trait that ties Rust types to it.

use half::{bf16, f16};

/// The element type of a [`Tensor`](crate::Tensor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// IEEE binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// Unsigned 32-bit integer (indices, labels, counts).
    U32,
}

impl DType {
    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Whether this is a floating-point type.
    pub const fn is_float(self) -> bool {
        !matches!(self, DType::U32)
    }

    /// The lowercase name used in kernel names and messages (`f32`, `bf16`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

mod sealed {
    /// Seals [`Element`](super::Element); with CUDA, also requires the types to cross to the device.
    #[cfg(feature = "cuda")]
    pub trait Sealed: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
    #[cfg(not(feature = "cuda"))]
    pub trait Sealed {}
}

/// A Rust type that can be stored in a [`Tensor`](crate::Tensor): `f32`, `f64`, `f16`, `bf16`, `u32`.
///
/// Sealed: the set of dtypes is fixed by the kernels.
pub trait Element:
    sealed::Sealed + bytemuck::Pod + Copy + Default + Send + Sync + std::fmt::Debug + PartialEq + 'static
{
    /// The dtype tag of this type.
    const DTYPE: DType;
    /// Converts to f64 (exact for every dtype).
    fn to_f64(self) -> f64;
    /// Converts from f64 with round-to-nearest-even (saturating for `u32`).
    fn from_f64(v: f64) -> Self;
    /// Converts to f32 (exact except f64 and large u32).
    fn to_f32(self) -> f32;
    /// Converts from f32 with round-to-nearest-even.
    fn from_f32(v: f32) -> Self;
}

macro_rules! float_element {
    ($t:ty, $d:expr, $to64:expr, $from64:expr, $to32:expr, $from32:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = $d;
            #[inline]
            fn to_f64(self) -> f64 {
                $to64(self)
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                $from64(v)
            }
            #[inline]
            fn to_f32(self) -> f32 {
                $to32(self)
            }
            #[inline]
            fn from_f32(v: f32) -> Self {
                $from32(v)
            }
        }
    };
}

float_element!(f32, DType::F32, |x: f32| x as f64, |v: f64| v as f32, |x| x, |v| v);
float_element!(f64, DType::F64, |x| x, |v| v, |x: f64| x as f32, |v: f32| v as f64);
float_element!(
    f16,
    DType::F16,
    |x: f16| x.to_f64(),
    |v| f16::from_f32(f32_round_to_odd(v)),
    |x: f16| x.to_f32(),
    f16::from_f32
);
float_element!(
    bf16,
    DType::BF16,
    |x: bf16| x.to_f64(),
    |v| bf16::from_f32(f32_round_to_odd(v)),
    |x: bf16| x.to_f32(),
    bf16::from_f32
);
float_element!(u32, DType::U32, |x: u32| x as f64, |v: f64| v as u32, |x: u32| x as f32, |v: f32| v as u32);

/// f64 → f32 with round-to-odd: the first half of a correctly rounded f64 → f16/bf16.
///
/// `half`'s `from_f64` rounds twice through f32 (seen: 14.45703164631105 → f16 14.453125, the
/// wrong neighbour). Rounding to odd first makes the second rounding exact: f32 keeps at least 13
/// more mantissa bits than f16 or bf16, and an odd last bit records that the value was inexact.
fn f32_round_to_odd(x: f64) -> f32 {
    let nearest = x as f32;
    if x.is_nan() || nearest as f64 == x {
        return nearest;
    }
    let bits = nearest.to_bits();
    if bits & 1 == 1 {
        return nearest;
    }
    // Step the magnitude one ulp back toward x: the truncation, with the sticky bit set.
    let toward_x = if (nearest as f64).abs() > x.abs() { bits - 1 } else { bits + 1 };
    f32::from_bits(toward_x)
}
