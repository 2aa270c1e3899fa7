//! The one boundary to the C++ shim in `csrc/` (compiled by build.rs against the libtorch tch links): every
//! `extern "C"` declaration of the project's own C++ code, one error channel ([`check`] reads the calling thread's
//! message from the shim's single per-thread slot), and owners for what the shim hands over.
//!
//! Parts: c10d (always; NCCL under `cfg(lmim_nccl)`), the optimiser kernels (always), the CUDA helpers under
//! `cfg(lmim_cuda)` (built where the CUDA headers are beside torch).
use std::ffi::{c_char, c_int, c_void, CStr};

use tch::Tensor;

use crate::error::{Error, Result};

pub type CTensor = *mut torch_sys::C_tensor;

extern "C" {
    fn lmim_last_error() -> *const c_char;

    pub fn lmim_c10d_has_nccl() -> c_int;
    pub fn lmim_c10d_has_gloo() -> c_int;
    pub fn lmim_c10d_connect(host: *const c_char, port: c_int, rank: c_int, size: c_int, client_only: c_int, timeout_ms: i64, prefix: *const c_char) -> *mut c_void;
    pub fn lmim_c10d_join(g: *mut c_void, backend: *const c_char, timeout_ms: i64, device: c_int) -> c_int;
    pub fn lmim_c10d_allreduce_sum(g: *mut c_void, ts: *mut CTensor, n: c_int) -> c_int;
    pub fn lmim_c10d_broadcast(g: *mut c_void, ts: *mut CTensor, n: c_int, root: c_int) -> c_int;
    pub fn lmim_c10d_allgather(g: *mut c_void, input: CTensor, outs: *mut CTensor, size: c_int) -> c_int;
    pub fn lmim_c10d_barrier(g: *mut c_void) -> c_int;
    pub fn lmim_c10d_fail(g: *mut c_void, msg: *const c_char) -> c_int;
    pub fn lmim_c10d_peer_failure(g: *mut c_void, buf: *mut c_char, len: c_int, found: *mut c_int) -> c_int;
    pub fn lmim_c10d_shutdown(g: *mut c_void) -> c_int;
    pub fn lmim_c10d_backend_error(g: *mut c_void) -> c_int;
    pub fn lmim_c10d_finish(g: *mut c_void, host: c_int, timeout_ms: i64, all_done: *mut c_int) -> c_int;
    pub fn lmim_c10d_store_set(g: *mut c_void, key: *const c_char) -> c_int;
    pub fn lmim_c10d_store_wait(g: *mut c_void, key: *const c_char, timeout_ms: i64) -> c_int;
    pub fn lmim_c10d_store_put(g: *mut c_void, key: *const c_char, data: *const c_char, len: c_int, watch: c_int) -> c_int;
    pub fn lmim_c10d_store_get(g: *mut c_void, key: *const c_char, timeout_ms: i64, buf: *mut c_char, len: c_int, out_len: *mut c_int) -> c_int;
    pub fn lmim_c10d_store_add(g: *mut c_void, key: *const c_char, delta: i64, watch: c_int, value: *mut i64) -> c_int;
    pub fn lmim_c10d_free(g: *mut c_void);
    pub fn lmim_set_cudnn_tf32(on: c_int) -> c_int;

    pub fn lmim_set_deterministic(on: c_int) -> c_int;
    pub fn lmim_grads_to_none(params: *mut CTensor, n: c_int) -> c_int;
    pub fn lmim_randperm_seeded(n: i64, seed: u64, out: *mut CTensor) -> c_int;
    pub fn lmim_fused_adamw(
        params: *mut CTensor,
        grads: *mut CTensor,
        exp_avgs: *mut CTensor,
        exp_avg_sqs: *mut CTensor,
        steps: *mut CTensor,
        found_inf: CTensor,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> c_int;
}

#[cfg(lmim_cuda)]
extern "C" {
    pub fn lmim_cuda_set_device(dev: c_int) -> c_int;
    pub fn lmim_pin_memory(src: CTensor, out: *mut CTensor) -> c_int;
    pub fn lmim_is_pinned(t: CTensor) -> c_int;
    pub fn lmim_cuda_peak_bytes(dev: c_int, reset: c_int, out: *mut i64) -> c_int;
    pub fn lmim_cuda_copy_ahead(src: *mut CTensor, n: c_int, dev: c_int, out: *mut CTensor, event: *mut *mut c_void) -> c_int;
    pub fn lmim_cuda_copy_wait(event: *mut c_void, dev: c_int) -> c_int;
    pub fn lmim_cuda_event_free(event: *mut c_void);
}

/// The calling thread's last shim error message.
pub fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message, valid until the next call.
    unsafe { CStr::from_ptr(lmim_last_error()) }.to_string_lossy().into_owned()
}

/// `Ok` for a shim return code of 0, else the thread's message as a libtorch error.
pub fn check(rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Torch(tch::TchError::Torch(last_error())))
    }
}

/// Handles of `ts` for a call that reads them (they stay owned by `ts`).
pub fn handles(ts: &[Tensor]) -> Vec<CTensor> {
    ts.iter().map(|t| t.as_ptr() as CTensor).collect()
}

/// Takes over tensors the shim made for the caller (null entries are skipped, so a partly filled array is freed).
///
/// # Safety
/// Every non-null pointer must be a heap tensor made by the shim for the caller and not taken over before.
pub unsafe fn take_tensors(ptrs: Vec<CTensor>) -> Vec<Tensor> {
    ptrs.into_iter().filter(|p| !p.is_null()).map(|p| Tensor::from_ptr(p)).collect()
}
