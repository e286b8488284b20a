//! Causal attention of one query token against one sequence's key/value cache,
//! for the query heads that share one key/value head (GQA).
//!
//! Streaming ("online") softmax over blocks of keys, so a task needs only
//! fixed stack buffers however long the context is; each key and value row is
//! read once for all heads of the group. A pure function: the forward pass
//! runs one call per (token, kv head) as parallel tasks.

use half::f16;

use super::load::MAX_GROUP;
use super::simd::{axpy_f16, dot_f16};

/// Keys per softmax block.
const KB: usize = 64;

/// The cache of one layer of one sequence, as `positions × kv_dim` f16.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub kv_dim: usize,
}

/// Writes `softmax(q·Kᵀ · scale) · V` for each head of the group into `out`.
///
/// `q` and `out` hold the group's heads one after another (`group × hd`);
/// keys `0..n_keys` are used, each at offset `kv_off` (this kv head) in its row.
pub fn attend(q: &[f32], kv: KvView<'_>, kv_off: usize, n_keys: usize, hd: usize, scale: f32, out: &mut [f32]) {
    let group = q.len() / hd;
    assert!(group <= MAX_GROUP && group * hd == q.len() && out.len() == q.len());
    assert!(kv.k.len() >= n_keys * kv.kv_dim && kv.v.len() >= n_keys * kv.kv_dim && kv_off + hd <= kv.kv_dim);
    let mut m = [f32::NEG_INFINITY; MAX_GROUP];
    let mut l = [0f32; MAX_GROUP];
    let mut s = [[0f32; KB]; MAX_GROUP];
    out.fill(0.0);
    for j0 in (0..n_keys).step_by(KB) {
        let j1 = (j0 + KB).min(n_keys);
        for j in j0..j1 {
            let k = &kv.k[j * kv.kv_dim + kv_off..][..hd];
            for h in 0..group {
                s[h][j - j0] = dot_f16(&q[h * hd..(h + 1) * hd], k) * scale;
            }
        }
        for h in 0..group {
            let sh = &mut s[h][..j1 - j0];
            let new_m = sh.iter().fold(m[h], |a, &b| a.max(b));
            let corr = (m[h] - new_m).exp();
            if corr != 1.0 {
                l[h] *= corr;
                out[h * hd..(h + 1) * hd].iter_mut().for_each(|o| *o *= corr);
            }
            for p in sh.iter_mut() {
                *p = (*p - new_m).exp();
                l[h] += *p;
            }
            m[h] = new_m;
        }
        for j in j0..j1 {
            let v = &kv.v[j * kv.kv_dim + kv_off..][..hd];
            for h in 0..group {
                axpy_f16(&mut out[h * hd..(h + 1) * hd], s[h][j - j0], v);
            }
        }
    }
    for h in 0..group {
        let inv = 1.0 / l[h];
        out[h * hd..(h + 1) * hd].iter_mut().for_each(|o| *o *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::testing::Rng;
    use super::*;

    /// Plain two-pass softmax attention in f32, the textbook way.
    fn reference(q: &[f32], k: &[f32], v: &[f32], kv_dim: usize, off: usize, n: usize, hd: usize) -> Vec<f32> {
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; q.len()];
        for h in 0..q.len() / hd {
            let qh = &q[h * hd..(h + 1) * hd];
            let s: Vec<f32> = (0..n)
                .map(|j| qh.iter().zip(&k[j * kv_dim + off..][..hd]).map(|(a, b)| a * b).sum::<f32>() * scale)
                .collect();
            let mx = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
            let sum: f32 = e.iter().sum();
            for j in 0..n {
                for d in 0..hd {
                    out[h * hd + d] += e[j] / sum * v[j * kv_dim + off + d];
                }
            }
        }
        out
    }

    #[test]
    fn streaming_softmax_matches_two_pass_reference() {
        let mut rng = Rng(23);
        let (hd, group, kv_dim) = (64, 3, 192);
        for n in [1, 5, 64, 65, 200] {
            let q: Vec<f32> = rng.vec(group * hd).iter().map(|x| x * 3.0).collect();
            let kf: Vec<f32> = rng.vec(n * kv_dim).iter().map(|x| f16::from_f32(*x * 3.0).to_f32()).collect();
            let vf: Vec<f32> = rng.vec(n * kv_dim).iter().map(|x| f16::from_f32(*x).to_f32()).collect();
            let k: Vec<f16> = kf.iter().map(|x| f16::from_f32(*x)).collect();
            let v: Vec<f16> = vf.iter().map(|x| f16::from_f32(*x)).collect();
            let mut out = vec![0f32; group * hd];
            let kv = KvView { k: &k, v: &v, kv_dim };
            attend(&q, kv, 64, n, hd, 1.0 / 8.0, &mut out);
            let want = reference(&q, &kf, &vf, kv_dim, 64, n, hd);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "n={n}: {a} vs {b}");
            }
        }
    }
}
