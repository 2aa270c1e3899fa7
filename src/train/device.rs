//! The two places where the training loops meet the host: reading device values back and copying batches to the
//! device. On CUDA a read (`.item()` in PyTorch) waits for every queued kernel, and a copy from pageable memory
//! waits too, so the GPU idles while the CPU prepares the next step. The loops read only at the steps that log,
//! checkpoint or end an epoch ([`read_f64s`], counted per thread so tests can assert it), and copy host batches
//! from pinned memory without waiting: [`copy_ahead`] puts the next micro-batch's copy on a copy stream so that it
//! overlaps the current step (the training loops), [`to_device_async`] queues a non-blocking copy on the compute
//! stream (as PyTorch's `DataLoader(pin_memory=True)` + `.to(device, non_blocking=True)`; evaluation and the
//! small index tensors of a step).
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
        let pinned = pinned(t, device);
        return pinned.to_device_(device, pinned.kind(), true, false);
    }
    t.to_device(device)
}

/// The CPU tensor `t` in pinned memory for copies to `device` (itself when it already is).
fn pinned(t: &Tensor, device: Device) -> Tensor {
    if t.is_pinned(device) {
        t.shallow_clone()
    } else {
        t.pin_memory(device)
    }
}

#[cfg(lmim_nccl)]
extern "C" {
    fn lmim_cuda_copy_ahead(src: *mut *mut torch_sys::C_tensor, n: i32, dev: i32, out: *mut *mut torch_sys::C_tensor, event: *mut *mut std::ffi::c_void) -> i32;
    fn lmim_cuda_copy_wait(event: *mut std::ffi::c_void, dev: i32) -> i32;
    fn lmim_cuda_event_free(event: *mut std::ffi::c_void);
    fn lmim_cuda_last_error() -> *const std::ffi::c_char;
}

#[cfg(lmim_nccl)]
fn cuda_error() -> Error {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
    Error::Torch(tch::TchError::Torch(unsafe { std::ffi::CStr::from_ptr(lmim_cuda_last_error()) }.to_string_lossy().into_owned()))
}

/// Copies of a batch that may still be in flight on the copy stream; [`Ready::wait`] orders them before the
/// kernels queued next. Dropping it unwaited frees the event (the copies stay valid for the copy stream's users).
#[must_use = "the copies may still be running: wait before using the tensors"]
pub struct Ready {
    event: Option<(*mut std::ffi::c_void, i32)>,
}

impl Ready {
    /// Nothing in flight (CPU, or copies already in the compute stream's order).
    pub fn now() -> Self {
        Ready { event: None }
    }

    /// Whether the copies went through the side stream (false on the CPU and in builds without the CUDA shim).
    pub fn on_side_stream(&self) -> bool {
        self.event.is_some()
    }

    /// Makes the compute stream wait for the copies. Waits on the device: the host goes on at once.
    pub fn wait(mut self) -> Result<()> {
        #[cfg(lmim_nccl)]
        if let Some((ev, dev)) = self.event.take() {
            // SAFETY: `ev` came from lmim_cuda_copy_ahead and is freed by this call (taken, so Drop skips it).
            if unsafe { lmim_cuda_copy_wait(ev, dev) } != 0 {
                return Err(cuda_error());
            }
        }
        self.event = None;
        Ok(())
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        #[cfg(lmim_nccl)]
        if let Some((ev, _)) = self.event.take() {
            // SAFETY: an event from lmim_cuda_copy_ahead that nobody waited on or freed.
            unsafe { lmim_cuda_event_free(ev) };
        }
    }
}

/// Whether [`copy_ahead`] may use the copy stream: `LMIM_COPY_STREAM=0` keeps every copy on the compute stream
/// (non-blocking all the same), an escape hatch for a driver or profiler that misbehaves with a second stream.
pub fn copy_stream_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMIM_COPY_STREAM").map_or(true, |v| v != "0"))
}

/// `ts` on `device`, copied ahead of the step that uses them. A CPU batch bound for CUDA is pinned and copied with
/// non-blocking copies on a copy stream of its own, so the copy of step i + 1's batch overlaps step i's kernels
/// instead of queuing behind them; the returned [`Ready`] must be waited on before the tensors are used. Elsewhere
/// (the CPU, a build without the CUDA shim) this is [`to_device_async`] and `Ready` has nothing to wait for.
pub fn copy_ahead(ts: &[&Tensor], device: Device) -> Result<(Vec<Tensor>, Ready)> {
    #[cfg(lmim_nccl)]
    if let Device::Cuda(dev) = device {
        if copy_stream_enabled() && ts.iter().all(|t| t.device() == Device::Cpu) {
            let pinned: Vec<Tensor> = ts.iter().map(|t| pinned(t, device)).collect();
            let mut src: Vec<_> = pinned.iter().map(|t| t.as_ptr() as *mut torch_sys::C_tensor).collect();
            let mut out = vec![std::ptr::null_mut(); ts.len()];
            let mut event = std::ptr::null_mut();
            // SAFETY: `src` are live tensor handles for the call; the shim fills `out` with new tensors we own.
            let rc = unsafe { lmim_cuda_copy_ahead(src.as_mut_ptr(), src.len() as i32, dev as i32, out.as_mut_ptr(), &mut event) };
            if rc != 0 {
                return Err(cuda_error());
            }
            // SAFETY: each pointer is a heap tensor made by the shim for us, taken over exactly once.
            let out = out.into_iter().map(|p| unsafe { Tensor::from_ptr(p) }).collect();
            return Ok((out, Ready { event: Some((event, dev as i32)) }));
        }
    }
    Ok((ts.iter().map(|t| to_device_async(t, device)).collect(), Ready::now()))
}
