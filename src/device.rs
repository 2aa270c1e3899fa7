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
        // A tensor that cannot be pinned is still copied, only synchronously.
        let src = pinned(t).unwrap_or_else(|_| t.shallow_clone());
        return src.to_device_(device, src.kind(), true, false);
    }
    t.to_device(device)
}

/// The CPU tensor `t` in pinned memory for copies to CUDA (itself when it already is). Through the shim, without
/// the device argument that tch passes and libtorch 2.11 deprecates with a warning on every call.
pub fn pinned(t: &Tensor) -> Result<Tensor> {
    #[cfg(lmim_cuda)]
    {
        use crate::ffi;
        let p = t.as_ptr() as ffi::CTensor;
        // SAFETY: `p` is a live handle for the calls; the shim hands over a new tensor only when it returns 0.
        match unsafe { ffi::lmim_is_pinned(p) } {
            1 => Ok(t.shallow_clone()),
            0 => {
                let mut out = std::ptr::null_mut();
                ffi::check(unsafe { ffi::lmim_pin_memory(p, &mut out) })?;
                Ok(unsafe { ffi::take_tensors(vec![out]) }.remove(0))
            }
            _ => ffi::check(1).map(|()| t.shallow_clone()),
        }
    }
    #[cfg(not(lmim_cuda))]
    Ok(t.shallow_clone())
}

/// Makes `device` the calling thread's current CUDA device (a no-op on the CPU and in builds without the CUDA
/// shim). CUDA's current device is per thread: a thread never bound works on device 0, so a rank that pins or
/// copies from a new thread would otherwise create a context on GPU 0 (PyTorch's pin-memory thread binds itself
/// for this reason: torch/utils/data/_utils/pin_memory.py).
pub fn bind_thread(device: Device) -> Result<()> {
    #[cfg(lmim_cuda)]
    if let Device::Cuda(i) = device {
        // SAFETY: a plain integer across the C boundary; the shim catches C++ exceptions.
        return crate::ffi::check(unsafe { crate::ffi::lmim_cuda_set_device(i as i32) });
    }
    let _ = device;
    Ok(())
}

static DETERMINISTIC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns libtorch's deterministic algorithms on (`torch.use_deterministic_algorithms(True)`, cuDNN deterministic,
/// no cuDNN autotuning), for runs that must repeat bit for bit on CUDA; an operation without a deterministic
/// kernel then fails with libtorch's message instead of running. cuBLAS needs `CUBLAS_WORKSPACE_CONFIG` for
/// deterministic results (PyTorch's reproducibility notes); it is set to `:4096:8` unless the user set it, which
/// only takes effect when called before the first CUDA work.
pub fn set_deterministic(on: bool) -> Result<()> {
    if on && std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
        std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
    }
    // SAFETY: a plain integer across the C boundary; the shim catches C++ exceptions.
    crate::ffi::check(unsafe { crate::ffi::lmim_set_deterministic(on as i32) })?;
    DETERMINISTIC.store(on, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Whether [`set_deterministic`] turned deterministic algorithms on (records say so).
pub fn deterministic() -> bool {
    DETERMINISTIC.load(std::sync::atomic::Ordering::Relaxed)
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
        #[cfg(lmim_cuda)]
        if let Some((ev, dev)) = self.event.take() {
            // SAFETY: `ev` came from lmim_cuda_copy_ahead and is freed by this call (taken, so Drop skips it).
            crate::ffi::check(unsafe { crate::ffi::lmim_cuda_copy_wait(ev, dev) })?;
        }
        self.event = None;
        Ok(())
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        #[cfg(lmim_cuda)]
        if let Some((ev, _)) = self.event.take() {
            // SAFETY: an event from lmim_cuda_copy_ahead that nobody waited on or freed.
            unsafe { crate::ffi::lmim_cuda_event_free(ev) };
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
    #[cfg(lmim_cuda)]
    if let Device::Cuda(dev) = device {
        if copy_stream_enabled() && ts.iter().all(|t| t.device() == Device::Cpu) {
            let pinned = ts.iter().map(|t| pinned(t)).collect::<Result<Vec<Tensor>>>()?;
            let mut src = crate::ffi::handles(&pinned);
            let mut out = vec![std::ptr::null_mut(); ts.len()];
            let mut event = std::ptr::null_mut();
            // SAFETY: `src` are live tensor handles for the call; the shim fills `out` with new tensors we own (all
            // of them, or none on a failure).
            let rc = unsafe { crate::ffi::lmim_cuda_copy_ahead(src.as_mut_ptr(), src.len() as i32, dev as i32, out.as_mut_ptr(), &mut event) };
            crate::ffi::check(rc)?;
            // SAFETY: each pointer is a heap tensor made by the shim for us, taken over exactly once.
            let out = unsafe { crate::ffi::take_tensors(out) };
            return Ok((out, Ready { event: Some((event, dev as i32)) }));
        }
    }
    Ok((ts.iter().map(|t| to_device_async(t, device)).collect(), Ready::now()))
}

/// `items` staged one ahead: `stage` (a copy to the device through [`copy_ahead`]) runs for item i + 1 before item i
/// is handed out (and its kernels queued), and item i's [`Ready`] is waited for, on the device, just before. The
/// evaluation and extraction loops read their batches this way, as the training loops do through
/// `TrainStep::stage`; an error of an item is raised at its turn.
pub fn stage_ahead<'a, T: 'a>(
    mut items: impl Iterator<Item = Result<T>> + 'a,
    mut stage: impl FnMut(T) -> Result<(T, Ready)> + 'a,
) -> impl Iterator<Item = Result<T>> + 'a {
    let mut next = move || items.next().map(|r| r.and_then(&mut stage));
    let mut ahead = next();
    std::iter::from_fn(move || {
        let current = ahead.take()?;
        ahead = next();
        Some(current.and_then(|(item, ready)| ready.wait().map(|()| item)))
    })
}

/// Images and labels on `device`, copied ahead ([`copy_ahead`]).
pub fn stage_pair((x, y): (Tensor, Tensor), device: Device) -> Result<((Tensor, Tensor), Ready)> {
    let (mut t, ready) = copy_ahead(&[&x, &y], device)?;
    let (y, x) = (t.pop().expect("two tensors"), t.pop().expect("two tensors"));
    Ok(((x, y), ready))
}
