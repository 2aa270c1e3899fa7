//! The two places where the training loops meet the host: reading device values back and copying batches to the
//! device. On CUDA a read (`.item()` in PyTorch) waits for every queued kernel, and a copy from pageable memory
//! waits too, so the GPU idles while the CPU prepares the next step. The loops read only at the steps that log,
//! checkpoint or end an epoch ([`read_f64s`], counted per thread so tests can assert it), and copy host batches
//! with [`to_device_async`]: pinned memory and a non-blocking copy, queued behind the previous step's kernels
//! while the CPU goes on (as PyTorch's `DataLoader(pin_memory=True)` + `.to(device, non_blocking=True)`).
use std::cell::Cell;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

thread_local! {
    static HOST_READS: Cell<usize> = const { Cell::new(0) };
}

/// Host reads of device values made by this thread through [`read_f64s`] so far.
pub fn host_reads() -> usize {
    HOST_READS.with(|c| c.get())
}

/// All values of `t` as f64 on the host: one device synchronisation, counted.
pub fn read_f64s(t: &Tensor) -> Result<Vec<f64>> {
    HOST_READS.with(|c| c.set(c.get() + 1));
    let host = t.detach().to_kind(Kind::Double).flatten(0, -1).to_device(Device::Cpu);
    Vec::<f64>::try_from(&host).map_err(Error::Torch)
}

/// `t` on `device`. A CPU tensor bound for CUDA goes through pinned memory with a non-blocking copy: the call
/// returns at once and the copy runs in stream order before the kernels that use it. libtorch's pinned-memory
/// allocator keeps the host block until the copy is done, so `t` may be dropped right away.
pub fn to_device_async(t: &Tensor, device: Device) -> Tensor {
    if t.device() == device {
        return t.shallow_clone();
    }
    if device.is_cuda() && t.device() == Device::Cpu {
        let pinned = if t.is_pinned(device) { t.shallow_clone() } else { t.pin_memory(device) };
        return pinned.to_device_(device, pinned.kind(), true, false);
    }
    t.to_device(device)
}
