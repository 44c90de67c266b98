//! Grouped-query attention of new tokens over a session's key and value buffers,
//! on the model's thread pool.
//!
//! Why not candle's ops: every turn of a call runs on top of the system prompt (about
//! 1,100 tokens with the tool definitions), so each decode step attends over at least
//! that many keys. Through candle that step copied the narrowed K and V views to
//! contiguous tensors, ran two small GEMMs and a softmax on one thread (candle's pool
//! is kept at one thread, see [`crate::pool`]), and built a mask tensor for every
//! prefill: one token after 1,140 took 21 ms where it takes 13.5 at the start of a
//! session. Here each (key/value head, new token) pair is one work item that reads
//! its keys and values straight from the buffers, up to its own position (the causal
//! mask is the loop bound), for every query head that shares them: one token after
//! 1,140 takes 14.1 ms (`llm_speed`-style timing, 2 threads). The model uses it for
//! decode steps only: a prefill's many query rows are better done as candle's GEMM
//! (an 18-token turn on top of 1,122 tokens took 85–100 ms here against 75–84),
//! which scores a key against many queries without a horizontal sum per pair.

// Index loops over heads, positions and lanes say more plainly what is read where.
#![allow(clippy::needless_range_loop)]

/// Sizes of one attention product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (each serves `n_head / n_kv_head` query heads).
    pub n_kv_head: usize,
    /// Values per head.
    pub head_dim: usize,
    /// New tokens.
    pub seq: usize,
    /// Position of the first new token (tokens already in the buffers).
    pub pos: usize,
    /// Positions the key/value buffers hold room for (their stride per head).
    pub capacity: usize,
}

/// A raw output pointer shared by workers that write disjoint elements.
struct SendPtr(*mut f32);
// SAFETY: see `attend`: each work item writes its own head's slice of its own row.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// `out (seq, n_head · head_dim)` = softmax(q · Kᵀ · scale) · V per query head, where
/// new token `i` (position `pos + i`) sees keys `0..=pos + i`.
///
/// `q` is `(n_head, seq, head_dim)`; `k` and `v` are `(n_kv_head, capacity,
/// head_dim)` buffers whose first `pos + seq` positions are filled.
///
/// # Panics
/// When a slice is shorter than its shape says.
pub fn attend(q: &[f32], k: &[f32], v: &[f32], s: Shape, scale: f32, out: &mut [f32]) {
    let Shape { n_head, n_kv_head, head_dim: dim, seq, pos, capacity } = s;
    assert!(n_kv_head > 0 && n_head.is_multiple_of(n_kv_head), "attention: {n_head} heads over {n_kv_head}");
    assert!(q.len() >= n_head * seq * dim, "attention: queries");
    assert!(k.len() >= n_kv_head * capacity * dim && v.len() >= n_kv_head * capacity * dim, "attention: buffers");
    assert!(pos + seq <= capacity, "attention: {pos} + {seq} past {capacity}");
    assert!(out.len() >= seq * n_head * dim, "attention: output");
    let group = n_head / n_kv_head;
    let out_ptr = SendPtr(out.as_mut_ptr());
    // An item is one new token against one key/value head, for the `group` query
    // heads that share it: each key and value row is read once for all of them.
    crate::pool::model_pool().run(n_kv_head * seq, |items| {
        let out_ptr = &out_ptr;
        let mut scores = Vec::with_capacity(group * (pos + seq));
        for item in items {
            let (kv, i) = (item / seq, item % seq);
            let visible = pos + i + 1;
            let keys = &k[kv * capacity * dim..][..visible * dim];
            let values = &v[kv * capacity * dim..][..visible * dim];
            scores.clear();
            scores.resize(group * visible, 0.0);
            for (j, key) in keys.chunks_exact(dim).enumerate() {
                for g in 0..group {
                    let query = &q[((kv * group + g) * seq + i) * dim..][..dim];
                    scores[g * visible + j] = dot(query, key) * scale;
                }
            }
            for g in 0..group {
                let h = kv * group + g;
                // SAFETY: item (kv, i) alone writes row i's slices of heads
                // kv * group.. (kv + 1) * group; `out` outlives the pool call and was
                // checked to be long enough.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(i * n_head * dim + h * dim), dim) };
                weigh(&mut scores[g * visible..(g + 1) * visible], values, dst);
            }
        }
    });
}

/// Turns one query's scores into softmax weights in place and writes the weighted
/// sum of the value rows to `out`.
fn weigh(scores: &mut [f32], values: &[f32], out: &mut [f32]) {
    let dim = out.len();
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for x in scores.iter_mut() {
        *x = exp(*x - max);
    }
    let inv = 1.0 / scores.iter().sum::<f32>();
    out.fill(0.0);
    for (&p, value) in scores.iter().zip(values.chunks_exact(dim)) {
        let p = p * inv;
        for (o, &x) in out.iter_mut().zip(value) {
            *o = x.mul_add(p, *o);
        }
    }
}

/// `eˣ` for `x ≤ 0` (a score minus the row's maximum), without branches so that the
/// loop over a row vectorises: `x · log₂e = n + f` with `n` whole and `|f| ≤ ½`, then
/// `2ⁿ` from the exponent bits and `e^(f · ln 2)` from its Taylor series to the sixth
/// power (error below 3·10⁻⁷ relative near 0, growing with |x| as the f32 product
/// `x · log₂e` loses digits: 6·10⁻⁶ at −87). Far below −87, `eˣ` is
/// flushed to about 10⁻³⁸, which a softmax cannot tell from zero.
#[inline]
fn exp(x: f32) -> f32 {
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    let n = (t + 0.5).floor();
    let g = (t - n) * std::f32::consts::LN_2;
    let p = 1.0 + g * (1.0 + g * (0.5 + g * (1.0 / 6.0 + g * (1.0 / 24.0 + g * (1.0 / 120.0 + g * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A dot product in eight independent lanes (vectorised by the compiler).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    // A tree, not a chain: three dependent adds instead of seven.
    let quads = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    (quads[0] + quads[2]) + (quads[1] + quads[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_values::values;

    /// Straight from the definition, in f64, with an explicit causal mask.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: Shape, scale: f32) -> Vec<f32> {
        let Shape { n_head, n_kv_head, head_dim: dim, seq, pos, capacity } = s;
        let group = n_head / n_kv_head;
        let mut out = vec![0f32; seq * n_head * dim];
        for h in 0..n_head {
            let kv = h / group;
            for i in 0..seq {
                let scores: Vec<f64> = (0..pos + seq)
                    .map(|j| {
                        if j > pos + i {
                            return f64::NEG_INFINITY;
                        }
                        let dot: f64 = (0..dim).map(|d| f64::from(q[(h * seq + i) * dim + d]) * f64::from(k[(kv * capacity + j) * dim + d])).sum();
                        dot * f64::from(scale)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for d in 0..dim {
                    let o: f64 = (0..pos + seq).map(|j| exps[j] / total * f64::from(v[(kv * capacity + j) * dim + d])).sum();
                    out[i * n_head * dim + h * dim + d] = o as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_with_the_causal_mask_and_shared_kv_heads() {
        for s in [
            Shape { n_head: 14, n_kv_head: 2, head_dim: 64, seq: 1, pos: 300, capacity: 512 },
            Shape { n_head: 14, n_kv_head: 2, head_dim: 64, seq: 18, pos: 1122, capacity: 1536 },
            Shape { n_head: 4, n_kv_head: 4, head_dim: 12, seq: 5, pos: 0, capacity: 5 },
            Shape { n_head: 6, n_kv_head: 2, head_dim: 128, seq: 3, pos: 7, capacity: 16 },
        ] {
            let q = values(s.n_head * s.seq * s.head_dim, 1);
            let k = values(s.n_kv_head * s.capacity * s.head_dim, 2);
            let v = values(s.n_kv_head * s.capacity * s.head_dim, 3);
            let scale = 1.0 / (s.head_dim as f32).sqrt();
            let want = reference(&q, &k, &v, s, scale);
            let mut got = vec![f32::NAN; s.seq * s.n_head * s.head_dim];
            attend(&q, &k, &v, s, scale, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5, "{s:?} at {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn the_branchless_exp_is_within_a_few_f32_steps() {
        let mut x = -100.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), f64::from(x).exp());
            let err = (f64::from(got) - want).abs();
            // The argument's own f32 rounding grows with |x| (about 2⁻²⁴·|x|·ln 2
            // relative): a few 10⁻⁷ over the spread of a softmax's scores.
            let bound = (3e-7 + 1e-7 * f64::from(x.abs())) * want;
            assert!(err <= bound || (x < -87.0 && got < 2e-38), "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn the_first_new_token_sees_only_itself_on_an_empty_cache() {
        // One head, two tokens, no cache: token 0 attends to itself alone, so its
        // output is its own value whatever the scores.
        let s = Shape { n_head: 1, n_kv_head: 1, head_dim: 8, seq: 2, pos: 0, capacity: 2 };
        let q = values(16, 4);
        let k = values(16, 5);
        let v = values(16, 6);
        let mut out = vec![0f32; 16];
        attend(&q, &k, &v, s, 0.3, &mut out);
        assert_eq!(&out[..8], &v[..8]);
    }
}
