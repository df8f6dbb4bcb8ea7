//! Arrays of `struct_size`-versioned records filled for the caller (the `_list`
//! calls): the caller sets `out[0].struct_size`, which is the element stride, and only
//! that many bytes of each element are written, so older callers keep working when a
//! record grows.

use crate::error::{Error, Result};

/// Writes at most `max` of `items()` into `out` (converted by `to_c`, which is given
/// the stride to store in `struct_size`) and the total number of items to `*count`.
/// `what` names the record type in errors.
///
/// # Safety
/// `count` must be valid or NULL; `out` valid for `max` elements of
/// `out[0].struct_size` bytes, or NULL when `max` is 0.
pub(super) unsafe fn fill_records<T, C: Copy>(
    what: &str,
    out: *mut C,
    max: usize,
    count: *mut usize,
    items: impl FnOnce() -> Result<Vec<T>>,
    to_c: impl Fn(&T, u32) -> C,
) -> Result<()> {
    if count.is_null() || (out.is_null() && max > 0) {
        return Err(Error::InvalidArgument(
            "count must be non-NULL, and out too when max > 0".into(),
        ));
    }
    let stride = if max > 0 {
        let declared = *(out as *const u32) as usize;
        if declared < 8 || !declared.is_multiple_of(8) {
            return Err(Error::InvalidArgument(format!(
                "{what}.struct_size is {declared}; set out[0].struct_size to sizeof({what})"
            )));
        }
        declared
    } else {
        0
    };
    let list = items()?;
    let n = stride.min(std::mem::size_of::<C>());
    for (i, item) in list.iter().take(max).enumerate() {
        let c = to_c(item, stride as u32);
        let dst = (out as *mut u8).add(i * stride);
        std::ptr::copy_nonoverlapping(&c as *const C as *const u8, dst, n);
    }
    *count = list.len();
    Ok(())
}
