//! Causal attention of one query token against one sequence's key/value cache,
//! for the query heads that share one key/value head (GQA).
//!
//! Streaming ("online") softmax over blocks of keys, so a task needs only
//! fixed stack buffers however long the context is; each key and value row is
//! read once for all heads of the group. A long context can be split into key
//! ranges whose partial softmax states [`merge`] combines exactly (as in
//! flash-decoding), so one decoding token still keeps every thread busy.
//! Pure functions: the forward pass runs one call per (token, kv head, key
//! range) as parallel tasks.

use half::f16;

use super::load::MAX_GROUP;
use super::simd::{accumulate_f16, exp_shift_sum, scores_f16};

/// Keys per softmax block.
const KB: usize = 64;

/// The cache of one layer of one sequence, as `positions × kv_dim` f16.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub kv_dim: usize,
}

/// Streaming-softmax state of one head over some keys: `acc` holds
/// `Σ e^(s_j - m) v_j` (unnormalised), `m` the largest score, `l = Σ e^(s_j - m)`.
/// A task's output is `group` of these, `hd + 2` floats each: `[acc.., m, l]`.
pub fn partial_len(hd: usize) -> usize {
    hd + 2
}

/// Attends the group's heads to keys `keys` and writes their partial states
/// into `out` (`group × partial_len(hd)`), to be combined by [`merge`].
///
/// `q` holds the group's heads one after another (`group × hd`); each key
/// and value row has this kv head at offset `kv_off`.
pub fn attend_partial(
    q: &[f32],
    kv: KvView<'_>,
    kv_off: usize,
    keys: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    let group = q.len() / hd;
    let pl = partial_len(hd);
    assert!(group <= MAX_GROUP && group * hd == q.len() && out.len() == group * pl);
    assert!(kv.k.len() >= keys.end * kv.kv_dim && kv.v.len() >= keys.end * kv.kv_dim && kv_off + hd <= kv.kv_dim);
    let mut m = [f32::NEG_INFINITY; MAX_GROUP];
    let mut l = [0f32; MAX_GROUP];
    let mut s = [[0f32; KB]; MAX_GROUP];
    out.fill(0.0);
    let stride = kv.kv_dim;
    for j0 in keys.clone().step_by(KB) {
        let j1 = (j0 + KB).min(keys.end);
        // Keys j0..j1 of this kv head: a strided view, re-read per head from L1.
        let ks = &kv.k[j0 * stride + kv_off..(j1 - 1) * stride + kv_off + hd];
        let vs = &kv.v[j0 * stride + kv_off..(j1 - 1) * stride + kv_off + hd];
        for h in 0..group {
            scores_f16(&q[h * hd..(h + 1) * hd], ks, stride, scale, &mut s[h][..j1 - j0]);
        }
        for h in 0..group {
            let sh = &mut s[h][..j1 - j0];
            let new_m = sh.iter().fold(m[h], |a, &b| a.max(b));
            let corr = (m[h] - new_m).exp();
            if corr != 1.0 {
                l[h] *= corr;
                out[h * pl..h * pl + hd].iter_mut().for_each(|o| *o *= corr);
            }
            l[h] += exp_shift_sum(sh, new_m);
            m[h] = new_m;
        }
        for h in 0..group {
            accumulate_f16(&mut out[h * pl..h * pl + hd], &s[h][..j1 - j0], vs, stride);
        }
    }
    for h in 0..group {
        out[h * pl + hd] = m[h];
        out[h * pl + hd + 1] = l[h];
    }
}

/// Combines the partial states of one head over disjoint key ranges into
/// the normalised attention output `out` (`hd` floats).
pub fn merge<'a>(parts: impl Iterator<Item = &'a [f32]> + Clone, out: &mut [f32]) {
    let hd = out.len();
    let m = parts.clone().fold(f32::NEG_INFINITY, |a, p| a.max(p[hd]));
    out.fill(0.0);
    let mut l = 0f32;
    for p in parts {
        let w = (p[hd] - m).exp();
        l += p[hd + 1] * w;
        out.iter_mut().zip(&p[..hd]).for_each(|(o, a)| *o += w * a);
    }
    let inv = 1.0 / l;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `softmax(q·Kᵀ · scale) · V` over keys `0..n_keys` for each head of the group
/// into `out` (`group × hd`), in one piece. (The forward pass uses the
/// partial/merge pair to split long contexts over threads.)
pub fn attend(q: &[f32], kv: KvView<'_>, kv_off: usize, n_keys: usize, hd: usize, scale: f32, out: &mut [f32]) {
    let pl = partial_len(hd);
    let mut part = [0f32; MAX_GROUP * (super::load::MAX_HEAD_DIM + 2)];
    let part = &mut part[..q.len() / hd * pl];
    attend_partial(q, kv, kv_off, 0..n_keys, hd, scale, part);
    for (p, o) in part.chunks_exact(pl).zip(out.chunks_exact_mut(hd)) {
        merge(std::iter::once(p), o);
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
            // The same keys in three ranges, merged.
            let pl = partial_len(hd);
            let cuts = [0, n / 3, 2 * n / 3, n];
            let mut parts = vec![0f32; 3 * group * pl];
            for (i, part) in parts.chunks_mut(group * pl).enumerate() {
                attend_partial(&q, kv, 64, cuts[i]..cuts[i + 1], hd, 1.0 / 8.0, part);
            }
            for h in 0..group {
                let mut o = vec![0f32; hd];
                let ps = (0..3).filter(|&i| cuts[i] < cuts[i + 1]).map(|i| &parts[(i * group + h) * pl..][..pl]);
                merge(ps, &mut o);
                for (a, b) in o.iter().zip(&want[h * hd..(h + 1) * hd]) {
                    assert!((a - b).abs() < 1e-5, "split n={n}: {a} vs {b}");
                }
            }
        }
    }
}
