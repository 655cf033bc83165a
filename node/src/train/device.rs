//! `--device auto|cpu|cuda:N`, resolved against what this libtorch build has.

use std::fmt;
use std::str::FromStr;

use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when libtorch sees one, otherwise the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("unknown --device {0:?} (expected auto, cpu or cuda:N)")]
    Unknown(String),
    #[error(
        "--device cuda:{0} but this libtorch sees {1} CUDA device(s); use --device cpu, or install the CUDA build (see README)"
    )]
    NoCuda(usize, usize),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The libtorch device to use, or why it cannot be had.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        let count = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto if count > 0 => Ok(Device::Cuda(0)),
            DeviceSpec::Auto => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) if n < count => Ok(Device::Cuda(n)),
            DeviceSpec::Cuda(n) => Err(DeviceError::NoCuda(n, count)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves() {
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cpu.resolve(), Ok(Device::Cpu));
        assert!(DeviceSpec::Cuda(99).resolve().is_err());
    }
}
