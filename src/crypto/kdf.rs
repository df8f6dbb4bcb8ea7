//! PBKDF2-HMAC and its calibration.

use std::time::{Duration, Instant};

use super::HashAlg;

/// PBKDF2-HMAC-`hash` of `password` and `salt` with `iterations` rounds into `out`.
pub(super) fn pbkdf2(hash: HashAlg, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    match hash {
        HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
        HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
        HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
    }
}

/// HMAC blocks PBKDF2 computes per iteration for an `out_len`-byte output.
pub(super) fn blocks(hash: HashAlg, out_len: usize) -> u64 {
    out_len.div_ceil(hash.digest_len()).max(1) as u64
}

/// CPU time of the calling thread (falls back to wall time where the clock is not
/// available). QEMU measures thread CPU time too (getrusage(RUSAGE_THREAD)), so other
/// load on the machine does not shrink the count.
fn thread_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc == 0 {
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }
}

/// PBKDF2 iterations per second of CPU time for a one-block output, measured the
/// way QEMU's `qcrypto_pbkdf2_count_iters` does — grow the count tenfold while a run
/// is short, rescale towards the window, extrapolate from the first run that fills
/// it — over a window of `window_ms` (QEMU always uses 500 ms; a short `iter-time`
/// needs less precision, and tests create many images).
pub(super) fn iterations_per_second(
    hash: HashAlg,
    password: &[u8],
    salt: &[u8],
    window_ms: u64,
) -> u64 {
    let window_ns = window_ms.max(1) * 1_000_000;
    let mut out = zeroize::Zeroizing::new(vec![0u8; hash.digest_len()]);
    let mut iterations: u64 = 1 << 12;
    loop {
        let n = iterations.min(u32::MAX as u64) as u32;
        let start = thread_time();
        pbkdf2(hash, password, salt, n, &mut out);
        let ns = (thread_time().saturating_sub(start)).as_nanos().max(1) as u64;
        if ns >= window_ns || n == u32::MAX {
            return (n as u128 * 1_000_000_000 / ns as u128).min(u64::MAX as u128) as u64;
        } else if ns < window_ns / 10 {
            iterations = iterations.saturating_mul(10);
        } else {
            // Aim a little past the window so the next run fills it.
            iterations = (iterations as u128 * window_ns as u128 * 5 / 4 / ns as u128) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// RFC 6070 PBKDF2-HMAC-SHA1 vectors (the 16,777,216-iteration one is left out
    /// for time).
    #[test]
    fn rfc6070() {
        let cases: &[(&[u8], &[u8], u32, &str)] = &[
            (
                b"password",
                b"salt",
                1,
                "0c60c80f961f0e71f3a9b524af6012062fe037a6",
            ),
            (
                b"password",
                b"salt",
                2,
                "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957",
            ),
            (
                b"password",
                b"salt",
                4096,
                "4b007901b765489abead49d926f721d065a429c1",
            ),
            (
                b"passwordPASSWORDpassword",
                b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
                4096,
                "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038",
            ),
            (
                b"pass\0word",
                b"sa\0lt",
                4096,
                "56fa6aa75548099dcc37d7f03425e0c3",
            ),
        ];
        for (p, s, c, want) in cases {
            let mut out = vec![0u8; want.len() / 2];
            pbkdf2(HashAlg::Sha1, p, s, *c, &mut out);
            assert_eq!(hex(&out), *want);
        }
        // And one PBKDF2-HMAC-SHA256 value (RFC 7914 section 11).
        let mut out = [0u8; 64];
        pbkdf2(HashAlg::Sha256, b"passwd", b"salt", 1, &mut out);
        assert_eq!(
            hex(&out),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
        );
    }

    #[test]
    fn block_counts() {
        assert_eq!(blocks(HashAlg::Sha256, 64), 2);
        assert_eq!(blocks(HashAlg::Sha1, 64), 4);
        assert_eq!(blocks(HashAlg::Sha1, 20), 1);
        assert_eq!(blocks(HashAlg::Sha512, 16), 1);
    }
}
