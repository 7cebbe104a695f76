//! Inputs derived from seeds, deterministically: what the test command
//! runs each target over besides the committed corpus. Each input is a
//! seed with one to four edits of the kinds libFuzzer makes (bit flips,
//! interesting bytes and lengths, cuts, insertions, repeated and spliced
//! slices) or, one time in sixteen, random bytes. The same seeds and
//! number give the same inputs on every machine.

use pagecast_pages::SplitMix64;

/// Bytes at the edges of signed and unsigned ranges.
const BYTES: [u8; 6] = [0, 1, 0x7f, 0x80, 0xfe, 0xff];
/// Little- and big-endian lengths at the edges.
const WORDS: [u32; 7] = [0, 1, 0xff, 0x100, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

/// `count` inputs derived from `seeds` (random bytes if there are none),
/// from the generator state `seed`.
pub fn inputs(seeds: &[Vec<u8>], count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = SplitMix64::new(seed);
    (0..count).map(|_| one(seeds, &mut rng)).collect()
}

fn one(seeds: &[Vec<u8>], rng: &mut SplitMix64) -> Vec<u8> {
    if seeds.is_empty() || rng.below(16) == 0 {
        let mut b = vec![0u8; rng.below(512) as usize];
        rng.fill(&mut b);
        return b;
    }
    let mut b = seeds[rng.below(seeds.len() as u64) as usize].clone();
    for _ in 0..=rng.below(4) {
        edit(&mut b, seeds, rng);
    }
    b
}

fn at(b: &[u8], rng: &mut SplitMix64) -> usize {
    rng.below(b.len() as u64 + 1) as usize
}

fn edit(b: &mut Vec<u8>, seeds: &[Vec<u8>], rng: &mut SplitMix64) {
    match rng.below(8) {
        0 if !b.is_empty() => {
            let i = rng.below(b.len() as u64) as usize;
            b[i] ^= 1 << rng.below(8);
        }
        1 if !b.is_empty() => {
            let i = rng.below(b.len() as u64) as usize;
            b[i] = BYTES[rng.below(BYTES.len() as u64) as usize];
        }
        2 if b.len() >= 4 => {
            let i = rng.below(b.len() as u64 - 3) as usize;
            let w = WORDS[rng.below(WORDS.len() as u64) as usize];
            let bytes = if rng.below(2) == 0 {
                w.to_le_bytes()
            } else {
                w.to_be_bytes()
            };
            b[i..i + 4].copy_from_slice(&bytes);
        }
        3 => {
            let cut = at(b, rng);
            b.truncate(cut);
        }
        4 => {
            let i = at(b, rng);
            let mut ins = vec![0u8; 1 + rng.below(16) as usize];
            rng.fill(&mut ins);
            b.splice(i..i, ins);
        }
        5 if !b.is_empty() => {
            let from = rng.below(b.len() as u64) as usize;
            let len = 1 + rng.below((b.len() - from).min(64) as u64) as usize;
            let slice = b[from..from + len].to_vec();
            let i = at(b, rng);
            b.splice(i..i, slice);
        }
        6 => {
            let other = &seeds[rng.below(seeds.len() as u64) as usize];
            let keep = at(b, rng);
            let from = at(other, rng);
            b.truncate(keep);
            b.extend_from_slice(&other[from..]);
        }
        _ if !b.is_empty() => {
            let i = rng.below(b.len() as u64) as usize;
            b.remove(i);
        }
        _ => b.push(rng.below(256) as u8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_deterministic_varied_and_close_to_their_seeds() {
        let seeds = vec![vec![1u8; 100], vec![2u8; 50]];
        let a = inputs(&seeds, 200, 9);
        assert_eq!(a, inputs(&seeds, 200, 9));
        assert_ne!(a, inputs(&seeds, 200, 10));
        let distinct: std::collections::HashSet<&Vec<u8>> = a.iter().collect();
        assert!(distinct.len() > 150, "{} distinct of 200", distinct.len());
        let near = a
            .iter()
            .filter(|x| x.iter().filter(|&&c| c == 1 || c == 2).count() * 2 > x.len())
            .count();
        assert!(near > 120, "{near} of 200 mostly seed bytes");
        assert_eq!(inputs(&[], 3, 1).len(), 3);
    }
}
