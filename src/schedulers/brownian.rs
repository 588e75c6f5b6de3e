//! The Brownian-tree noise of diffusers' `DPMSolverSDEScheduler` ("DPM++ SDE"), reproduced to the bit: its
//! `BrownianTreeNoiseSampler` over a single `torchsde.BrownianInterval` (halfway tree, `tol` 1e-6, pool size 24, no
//! Lévy area), whose every node draws its noise from a fresh `torch.Generator("cpu")` seeded by numpy's
//! `SeedSequence`.
//!
//! What torchsde and diffusers do, and in which precision:
//!
//! * **Times** are Python floats (f64). diffusers hands the sampler float32 σ values (its sigmas are a float32
//!   tensor) and uses σ itself as the time (the sampler's `transform` is the identity; no `t = −log σ` here). The
//!   tree's interval is `[σ_min, σ_max]`, the smallest non-zero and the largest σ of the schedule. Every time the
//!   tree stores or looks up is first rounded to 6 decimals (`tol` = 1e-6: Python's `round(x, 6)`, correctly
//!   rounded, ties to even); a query outside the interval is clamped to it (torchsde only warns).
//! * **Tree**: each node is an interval; splitting a node always cuts it at its (rounded) halfway point, and
//!   splitting towards a query time cuts the child holding it again until a cut falls exactly on it. A query
//!   `[a, b]` is answered by the list of existing nodes that tile it (found from the last node answered, going up
//!   until a node holds the query, then down), creating the cuts it needs; its increment is their sum, added in
//!   order. Which nodes exist depends on earlier queries, so the order of queries matters to the last bit.
//! * **Increments** (float32 tensors, the sample's shape): the root's is `randn(seed_W) · √(t1 − t0)` (unrounded
//!   t0, t1); a child's comes from its parent's W by the Brownian bridge: `left = W·(m − s)·(1/(e − s)) +
//!   √((m − s)(e − m)/(e − s)) · randn(parent's seed_W)` with the scalars computed in f64 and rounded to f32 where
//!   they meet the tensor, `right = W − left`. Results do not depend on torchsde's LRU cache (a dropped node is
//!   recomputed identically), so the cache here is sized for speed (the ancestors queries keep coming back to), and
//!   the bridge noise a query needs is drawn ahead, in parallel (each split has its own generator).
//! * **Queries closer than the tolerance** round to the same time: torchsde answers some with zeros (or a rounding
//!   residue) and recurses forever on others (Python's `RecursionError`), which are errors here.
//! * **Seeds**: the root's three seeds are `SeedSequence(entropy, pool_size=24).generate_state(3)`; a node split
//!   at depth d with spawn key k (root 0; left child 2k, right child 2k + 1) gets
//!   `SeedSequence(entropy, spawn_key=(k, d), pool_size=24).generate_state(4)`, the first word seeding its
//!   children's bridge noise (`torch.Generator().manual_seed(word)`, drawn with [`TorchRng`]).
//! * **Noise**: `sampler(σ, σ_next)` sorts the two times, takes the tree's increment over them (negated when
//!   `σ > σ_next`, as the sort's sign says) and divides it by the float32 `√|σ_next − σ|`. That square root is the
//!   one place this cannot follow torch to the bit: torch's CPU float32 `sqrt` (like its `exp` and `log`) runs Intel
//!   MKL's vector math (`vmsSqrt`, high-accuracy mode), closed source, CPU-dependent and not always correctly
//!   rounded; the correctly rounded root is used here (see [`BrownianTreeNoiseSampler::noise`]).
//!
//! diffusers builds the tree on the sample's device and dtype: this reproduces it for float32 samples on the CPU,
//! which is what the scheduler's float32 `update` computes in. (On a CUDA device torch would seed CUDA generators,
//! whose numbers differ.)

use std::collections::{HashMap, VecDeque};

use rayon::prelude::*;

use crate::rng::TorchRng;
use crate::{Error, Result};

/// diffusers' arguments to `torchsde.BrownianInterval`.
const POOL_SIZE: usize = 24;
/// Increments kept in memory: about this many bytes' worth, between [`MIN_CACHED`] (torchsde's `cache_size`) and
/// [`MAX_CACHED`] increments. Any bound gives the same numbers (a dropped increment is recomputed identically); this
/// one holds the ancestors a run of queries keeps coming back to.
const CACHE_BYTES: usize = 64 << 20;
const MIN_CACHED: usize = 45;
const MAX_CACHED: usize = 512;
/// Bridge noise drawn ahead of a query, in parallel: at most about this many bytes at once.
const PREFETCH_BYTES: usize = 128 << 20;

/// numpy's `SeedSequence` (numpy/random/bit_generator.pyx): a pool of 32-bit words hashed from the entropy and
/// the spawn key, from which `generate_state` draws seeds.
#[derive(Debug, Clone)]
pub struct SeedSequence {
    pool: Vec<u32>,
}

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut value = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    value = value.wrapping_mul(*hash_const);
    value ^ (value >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let result = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    result ^ (result >> XSHIFT)
}

/// A non-negative Python int as numpy splits it into 32-bit words: least significant first, 0 as one zero word.
fn int_words(mut n: u128) -> Vec<u32> {
    if n == 0 {
        return vec![0];
    }
    let mut words = Vec::new();
    while n > 0 {
        words.push(n as u32);
        n >>= 32;
    }
    words
}

impl SeedSequence {
    /// `numpy.random.SeedSequence(entropy, spawn_key=spawn_key, pool_size=pool_size)` (numpy requires a pool of at
    /// least 4 words; smaller values are raised to 4 here).
    pub fn new(entropy: u128, spawn_key: &[u128], pool_size: usize) -> Self {
        let spawn: Vec<u32> = spawn_key.iter().flat_map(|&k| int_words(k)).collect();
        Self::from_words(int_words(entropy), spawn, pool_size)
    }

    /// From the entropy's and the spawn key's 32-bit words (see [`int_words`]).
    fn from_words(mut run_entropy: Vec<u32>, spawn_entropy: Vec<u32>, pool_size: usize) -> Self {
        let pool_size = pool_size.max(4);
        // numpy pads the entropy with zeros to the pool size when there is a spawn key (not otherwise, to stay
        // compatible with its older streams).
        if !spawn_entropy.is_empty() && run_entropy.len() < pool_size {
            run_entropy.resize(pool_size, 0);
        }
        let entropy: Vec<u32> = run_entropy.into_iter().chain(spawn_entropy).collect();

        let mut pool = vec![0u32; pool_size];
        let mut hash_const = INIT_A;
        for (i, word) in pool.iter_mut().enumerate() {
            *word = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
        }
        // Every word mixed into every other, so late words affect early ones.
        for src in 0..pool_size {
            for dst in 0..pool_size {
                if src != dst {
                    let hashed = hashmix(pool[src], &mut hash_const);
                    pool[dst] = mix(pool[dst], hashed);
                }
            }
        }
        // Entropy beyond the pool size, mixed into every word.
        for &word in entropy.iter().skip(pool_size) {
            for dst in pool.iter_mut() {
                let hashed = hashmix(word, &mut hash_const);
                *dst = mix(*dst, hashed);
            }
        }
        Self { pool }
    }

    /// `generate_state(n_words)` (uint32 words).
    pub fn generate_state(&self, n_words: usize) -> Vec<u32> {
        let mut hash_const = INIT_B;
        self.pool
            .iter()
            .cycle()
            .take(n_words)
            .map(|&word| {
                let mut value = word ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                value = value.wrapping_mul(hash_const);
                value ^ (value >> XSHIFT)
            })
            .collect()
    }
}

/// Python's `round(x, 6)`: the double nearest to `x` correctly rounded to 6 decimals (ties to even, decided on the
/// exact binary value), which is what Rust's fixed-precision formatting computes.
fn round6(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.6}").parse().unwrap_or(x)
}

/// A spawn key: a non-negative integer of any size as 32-bit words, least significant first (no zero high words;
/// 0 is one zero word, as numpy splits it).
#[derive(Debug, Clone)]
struct SpawnKey(Vec<u32>);

impl SpawnKey {
    fn root() -> Self {
        Self(vec![0])
    }

    /// `2·self + bit`.
    fn child(&self, bit: u32) -> Self {
        let mut words = Vec::with_capacity(self.0.len() + 1);
        let mut carry = bit;
        for &w in &self.0 {
            words.push((w << 1) | carry);
            carry = w >> 31;
        }
        if carry != 0 {
            words.push(carry);
        }
        while words.len() > 1 && words.last() == Some(&0) {
            words.pop();
        }
        Self(words)
    }
}

/// What a node knows once it has been split.
#[derive(Debug, Clone)]
struct Split {
    midway: f64,
    left: usize,
    right: usize,
    /// Seeds the noise of the bridge from this node's increment to its children's.
    w_seed: u32,
    spawn_key: SpawnKey,
    depth: u64,
}

#[derive(Debug, Clone)]
struct Node {
    start: f64,
    end: f64,
    /// `None` for the root.
    parent: Option<usize>,
    is_left: bool,
    split: Option<Split>,
}

/// `torchsde.BrownianInterval(t0, t1, size=shape, dtype=float32, entropy=seed, tol=1e-6, pool_size=24,
/// halfway_tree=True)` on the CPU: a Brownian motion over `[t0, t1]` queried by increments.
#[derive(Debug, Clone)]
pub struct BrownianInterval {
    len: usize,
    entropy: u64,
    nodes: Vec<Node>,
    /// The root's increment (kept for good, as torchsde does).
    root_w: Vec<f32>,
    /// Recently used increments, by node, least recently used first.
    cache: VecDeque<(usize, Vec<f32>)>,
    cache_size: usize,
    /// The last node of the last query, where the next search starts.
    last: usize,
}

const ROOT: usize = 0;

impl BrownianInterval {
    /// A tree over `[t0, t1]` (`t0 ≤ t1`, both finite) for increments of `len` float32 values, seeded by
    /// `entropy`.
    pub fn new(t0: f64, t1: f64, len: usize, entropy: u64) -> Result<Self> {
        if !(t0.is_finite() && t1.is_finite() && t0 <= t1) {
            return Err(brownian_error(format!("the interval [{t0}, {t1}] must be finite and ordered")));
        }
        let seeds = SeedSequence::new(entropy.into(), &[], POOL_SIZE).generate_state(3);
        // W, then H (the space-time Lévy area, unused here) and the Lévy-area seed: only W is drawn, each draw
        // having its own generator.
        let sd = (t1 - t0).sqrt() as f32;
        let root_w = TorchRng::new(seeds[0].into()).randn(len).into_iter().map(|v| v * sd).collect();
        let root = Node { start: round6(t0), end: round6(t1), parent: None, is_left: false, split: None };
        let cache_size = (CACHE_BYTES / (4 * len.max(1))).clamp(MIN_CACHED, MAX_CACHED);
        Ok(Self { len, entropy, nodes: vec![root], root_w, cache: VecDeque::new(), cache_size, last: ROOT })
    }

    /// The increment `W(tb) − W(ta)` (`tb ≥ ta` once clamped to the interval), as `tree(ta, tb)`.
    pub fn increment(&mut self, ta: f64, tb: f64) -> Result<Vec<f32>> {
        if ta.is_nan() || tb.is_nan() {
            return Err(brownian_error(format!("query times must be numbers, got {ta} and {tb}")));
        }
        let (start, end) = (self.nodes[ROOT].start, self.nodes[ROOT].end);
        let ta = ta.clamp(start, end);
        let tb = tb.clamp(start, end);
        if ta > tb {
            return Err(brownian_error(format!("query times ta={ta} and tb={tb} must respect ta <= tb")));
        }
        if ta == tb {
            return Ok(vec![0.0; self.len]);
        }
        let mut intervals = Vec::new();
        self.locate(self.last, round6(ta), round6(tb), &mut intervals)?;
        self.last = *intervals.last().expect("a query covers at least one interval");
        let mut noises = self.bridge_noises(&intervals);
        let mut w = self.node_increment(intervals[0], &mut noises);
        for &node in &intervals[1..] {
            let wi = self.node_increment(node, &mut noises);
            w.iter_mut().zip(&wi).for_each(|(a, b)| *a += b);
        }
        Ok(w)
    }

    /// Appends to `out` the nodes tiling `[ta, tb]` (rounded times), searching from `node`: up while the node does
    /// not hold the query, then down, splitting where no node ends at a query time.
    fn locate(&mut self, node: usize, ta: f64, tb: f64, out: &mut Vec<usize>) -> Result<()> {
        let Node { start, end, parent, .. } = self.nodes[node];
        if ta < start || tb > end {
            // Only the root holds every query (they are clamped to it), so a node that does not has a parent.
            let parent = parent.expect("the root holds every clamped query");
            return self.locate(parent, ta, tb, out);
        }
        if ta == start && tb == end {
            out.push(node);
            return Ok(());
        }
        match &self.nodes[node].split {
            None if ta == start => {
                self.split(node, tb)?;
                let left = self.children(node).0;
                self.locate(left, ta, tb, out)
            }
            None => {
                self.split(node, ta)?;
                let right = self.children(node).1;
                self.locate(right, ta, tb, out)
            }
            Some(split) => {
                let (midway, left, right) = (split.midway, split.left, split.right);
                if tb <= midway {
                    self.locate(left, ta, tb, out)
                } else if ta >= midway {
                    self.locate(right, ta, tb, out)
                } else {
                    self.locate(left, ta, midway, out)?;
                    self.locate(right, midway, tb, out)
                }
            }
        }
    }

    fn children(&self, node: usize) -> (usize, usize) {
        let split = self.nodes[node].split.as_ref().expect("a split node");
        (split.left, split.right)
    }

    /// Splits an unsplit node at its halfway point, then the child holding `time` again, until a cut falls on
    /// `time`.
    ///
    /// When the query's two times are closer than the tolerance, the rounded halfway point of a node one tolerance
    /// wide can fall on the node's far end, so that the child to split again is the node itself: torchsde then
    /// recurses until Python's recursion limit (a `RecursionError`); this is an error here.
    fn split(&mut self, node: usize, time: f64) -> Result<()> {
        let Node { start, end, .. } = self.nodes[node];
        let midway = self.split_exact(node, 0.5 * (end + start));
        let (left, right) = self.children(node);
        if (time > midway && midway == start) || (time < midway && midway == end) {
            return Err(brownian_error(format!(
                "cannot split [{start}, {end}] at {time}: the query's times are closer than the tolerance (1e-6)"
            )));
        }
        if time > midway {
            self.split(right, time)
        } else if time < midway {
            self.split(left, time)
        } else {
            Ok(())
        }
    }

    /// Cuts `node` at `midway` (rounded): its seeds from its spawn key and depth, and two new children.
    fn split_exact(&mut self, node: usize, midway: f64) -> f64 {
        let midway = round6(midway);
        let (spawn_key, depth) = match self.nodes[node].parent {
            None => (SpawnKey::root(), 0),
            Some(parent) => {
                let up = self.nodes[parent].split.as_ref().expect("a parent is split");
                (up.spawn_key.child(u32::from(!self.nodes[node].is_left)), up.depth + 1)
            }
        };
        let spawn: Vec<u32> = spawn_key.0.iter().copied().chain(int_words(depth.into())).collect();
        let w_seed = SeedSequence::from_words(int_words(self.entropy.into()), spawn, POOL_SIZE).generate_state(4)[0];
        let Node { start, end, .. } = self.nodes[node];
        let left = self.nodes.len();
        let child = |start, end, is_left| Node {
            start: round6(start),
            end: round6(end),
            parent: Some(node),
            is_left,
            split: None,
        };
        self.nodes.push(child(start, midway, true));
        self.nodes.push(child(midway, end, false));
        self.nodes[node].split = Some(Split { midway, left, right: left + 1, w_seed, spawn_key, depth });
        midway
    }

    /// A node's increment: the root's, a cached one, or one bridged from its parent's (both children at once).
    fn node_increment(&mut self, node: usize, noises: &mut HashMap<usize, Vec<f32>>) -> Vec<f32> {
        if node == ROOT {
            return self.root_w.clone();
        }
        if let Some(at) = self.cache.iter().position(|(n, _)| *n == node) {
            // Least recently used first: a hit moves to the back.
            let entry = self.cache.remove(at).expect("found above");
            let w = entry.1.clone();
            self.cache.push_back(entry);
            return w;
        }
        let parent = self.nodes[node].parent.expect("a non-root node has a parent");
        let w = self.node_increment(parent, noises);
        let Node { start, end, .. } = self.nodes[parent];
        let split = self.nodes[parent].split.as_ref().expect("a parent is split");
        let (left, right, midway, seed) = (split.left, split.right, split.midway, split.w_seed);
        let h_reciprocal = 1.0 / (end - start);
        let left_diff = midway - start;
        let right_diff = end - midway;
        // `mean = left_diff * W * h_reciprocal`: two float32 scalings.
        let (a, b) = (left_diff as f32, h_reciprocal as f32);
        let var = left_diff * right_diff * h_reciprocal;
        let sd = var.sqrt() as f32;
        let noise = noises.remove(&parent).unwrap_or_else(|| TorchRng::new(seed.into()).randn(self.len));
        let left_w: Vec<f32> = w.iter().zip(&noise).map(|(&w, &z)| w * a * b + sd * z).collect();
        let right_w: Vec<f32> = w.iter().zip(&left_w).map(|(&w, &l)| w - l).collect();
        let wanted = if node == left { left_w.clone() } else { right_w.clone() };
        self.remember(left, left_w);
        self.remember(right, right_w);
        wanted
    }

    /// The bridge noise of the splits between `nodes` and their nearest ancestors with a known increment (those
    /// nearest the root first, within [`PREFETCH_BYTES`]), drawn in parallel: each split has a generator of its own,
    /// so the order of the draws does not matter.
    fn bridge_noises(&self, nodes: &[usize]) -> HashMap<usize, Vec<f32>> {
        let mut parents = Vec::new();
        for &node in nodes {
            let mut chain = Vec::new();
            let mut n = node;
            while n != ROOT && !self.cache.iter().any(|(cached, _)| *cached == n) {
                let parent = self.nodes[n].parent.expect("a non-root node has a parent");
                if !parents.contains(&parent) && !chain.contains(&parent) {
                    chain.push(parent);
                }
                n = parent;
            }
            parents.extend(chain.into_iter().rev());
        }
        parents.truncate((PREFETCH_BYTES / (4 * self.len.max(1))).max(1));
        let seed = |p: usize| self.nodes[p].split.as_ref().expect("a parent is split").w_seed;
        parents.par_iter().map(|&p| (p, TorchRng::new(seed(p).into()).randn(self.len))).collect()
    }

    fn remember(&mut self, node: usize, w: Vec<f32>) {
        if self.cache.len() >= self.cache_size {
            self.cache.pop_front();
        }
        self.cache.push_back((node, w));
    }
}

fn brownian_error(message: String) -> Error {
    Error::Tensor(candle_core::Error::Msg(format!("Brownian tree: {message}")))
}

/// diffusers' `BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed)` for a float32 sample of `len` values on
/// the CPU: standard-normal noise for each step `σ → σ_next`, correlated across steps as one Brownian motion.
#[derive(Debug, Clone)]
pub struct BrownianTreeNoiseSampler {
    tree: BrownianInterval,
    /// −1 when diffusers' sort swapped `σ_min` and `σ_max` (they are equal), else 1.
    sign: f32,
}

impl BrownianTreeNoiseSampler {
    /// The sampler over `[σ_min, σ_max]` (float32, as diffusers passes them), seeded by `seed` (diffusers'
    /// `noise_sampler_seed`).
    pub fn new(len: usize, sigma_min: f32, sigma_max: f32, seed: u64) -> Result<Self> {
        let (t0, t1, sign) = sort(sigma_min, sigma_max);
        Ok(Self { tree: BrownianInterval::new(t0.into(), t1.into(), len, seed)?, sign })
    }

    /// `sampler(sigma, sigma_next)`: [`Self::increment`] divided by `√|sigma_next − sigma|` (float32; NaN where the
    /// two are equal, as in diffusers).
    ///
    /// torch computes that float32 square root with Intel MKL's vector math on the CPU, which is not always
    /// correctly rounded (about one result in five is 1 ulp off on an AVX2 AMD EPYC); this uses the correctly rounded
    /// one, so the noise can differ from diffusers' by 1 ulp of the divisor.
    pub fn noise(&mut self, sigma: f32, sigma_next: f32) -> Result<Vec<f32>> {
        let divisor = (sigma_next - sigma).abs().sqrt();
        Ok(self.increment(sigma, sigma_next)?.into_iter().map(|v| v / divisor).collect())
    }

    /// The Brownian motion's increment from `sigma` to `sigma_next` (negative when going down), bit for bit
    /// diffusers' `sampler.tree(sigma, sigma_next)`.
    pub fn increment(&mut self, sigma: f32, sigma_next: f32) -> Result<Vec<f32>> {
        let (t0, t1, sign) = sort(sigma, sigma_next);
        let sign = self.sign * sign;
        Ok(self.tree.increment(t0.into(), t1.into())?.into_iter().map(|v| v * sign).collect())
    }
}

/// diffusers' `BatchedBrownianTree.sort`: the two times in increasing order and 1, or swapped and −1 (also when
/// equal).
fn sort(a: f32, b: f32) -> (f32, f32, f32) {
    if a < b {
        (a, b, 1.0)
    } else {
        (b, a, -1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round6_is_pythons_round() {
        // Exact binary ties go to the even digit, as Python's round does.
        assert_eq!(round6(0.0078125), 0.007812);
        assert_eq!(round6(0.0234375), 0.023438);
        assert_eq!(round6(14.614641189575195), 14.614641);
        assert_eq!(round6(0.029167532920837402), 0.029168);
        // Python's own `round(x, 6)` (tests/fixtures/brownian.json, scripts/make_brownian_refs.py).
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/brownian.json");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = json["rounding"].as_array().unwrap();
        assert!(cases.len() >= 20);
        for case in cases {
            let x = case["x"].as_f64().unwrap();
            assert_eq!(round6(x), case["round6"].as_f64().unwrap(), "round({x}, 6)");
        }
    }

    #[test]
    fn spawn_keys_double_across_words() {
        let mut key = SpawnKey::root();
        for _ in 0..40 {
            key = key.child(1);
        }
        // 2^40 − 1: forty ones.
        assert_eq!(key.0, vec![u32::MAX, 0xff]);
        assert_eq!(SpawnKey::root().child(0).0, vec![0]);
    }

    #[test]
    fn increments_add_up_and_equal_queries_are_zero() {
        let mut tree = BrownianInterval::new(0.03, 14.6, 20, 7).unwrap();
        let whole = tree.increment(0.03, 14.6).unwrap();
        let a = tree.increment(0.03, 2.5).unwrap();
        let b = tree.increment(2.5, 14.6).unwrap();
        for ((w, a), b) in whole.iter().zip(&a).zip(&b) {
            assert!((w - (a + b)).abs() <= 1e-5 * w.abs().max(1.0), "{w} vs {a} + {b}");
        }
        assert_eq!(tree.increment(1.0, 1.0).unwrap(), vec![0.0; 20]);
        assert!(tree.increment(f64::NAN, 1.0).is_err());
        assert!(BrownianInterval::new(2.0, 1.0, 4, 0).is_err());
    }
}
