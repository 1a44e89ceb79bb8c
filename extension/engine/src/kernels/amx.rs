//! Matrix products of bfloat16-rounded operands with float32 accumulation on AMX tiles
//! (`tdpbf16ps`), for the bfloat16 mixed-precision training passes, whose linear layers round
//! both operands to bfloat16 anyway. Where the CPU has no AMX (or the kernel does not grant a
//! process its tile state) `available()` is false and callers use the float32 kernels on
//! rounded copies: the same products, summed in another order.
//!
//! Blocking: the result is computed in 32 × 32 blocks, each four 16 × 16 float32 tiles fed by
//! two 16-row tiles of A and two 16-column tiles of B per 32 values of the inner dimension.
//! Both operands are packed once per call into bfloat16 tiles (A row-major, B in the pair-
//! interleaved layout `tdpbf16ps` reads), zero-padded to whole tiles. Passes of 256 rows of A
//! (kept in L2) run over the blocks of 32 result columns, which are the compute pool's tasks.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::matmul::{Accumulate, MatRef};
use crate::model::dtype::bf16_bits;
use crate::parallel;

/// Rows and columns of a result block, and values of the inner dimension per tile step.
const BLOCK: usize = 32;
/// bfloat16 values in one packed tile: 16 rows of 64 bytes.
const TILE: usize = 512;
/// Row blocks of A per pass over the column blocks (256 rows).
const ROW_BLOCKS_PER_PASS: usize = 8;

/// Whether `gemm_bf16` runs here: the CPU has AMX-TILE and AMX-BF16 and the operating system
/// lets this process use the tile state (asked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID leaf 7 (after leaf 0 says it exists): EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let has_amx = __cpuid_count(0, 0).eax >= 7 && {
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    };
    if !has_amx || !std::is_x86_feature_detected!("avx512f") {
        return false;
    }
    // Linux hands out the (8 KB) tile state only to processes that ask for it.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// dst[m, n] = (or +=) a[m, k] · b[k, n] with both operands rounded to bfloat16 (nearest,
/// ties to even) and the products accumulated in float32, on the compute pool. Only when
/// `available()`.
pub fn gemm_bf16(dst: &mut [f32], a: MatRef, b: MatRef, acc: Accumulate) {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    assert_eq!(k, b.rows(), "inner dimensions differ");
    assert!(dst.len() >= m * n, "destination too small");
    assert!(available(), "gemm_bf16 without AMX");
    if m == 0 || n == 0 {
        return;
    }
    let chunks = k.div_ceil(BLOCK).max(1);
    let (m_blocks, n_blocks) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK));
    // Each task computes a column block of the result: its rows of dst are scattered, so the
    // tasks get the column index and write through a shared pointer to disjoint cells.
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    parallel::install(|| {
        let packed_a = pack(a, false, m_blocks, chunks, false);
        let packed_b = pack(b, true, n_blocks, chunks, true);
        let step = chunks * 2 * TILE;
        // A pass takes up to 256 rows of A, whose tiles stay in L2 while the column blocks
        // stream past them; a task runs several column blocks under one tile configuration.
        for first in (0..m_blocks).step_by(ROW_BLOCKS_PER_PASS) {
            let row_blocks = first..(first + ROW_BLOCKS_PER_PASS).min(m_blocks);
            (0..n_blocks)
                .into_par_iter()
                .with_min_len(4)
                .for_each(|nb| {
                    let _tiles = TileConfig::load();
                    let b_tiles = &packed_b[nb * step..(nb + 1) * step];
                    let mut block = [0.0f32; BLOCK * BLOCK];
                    for mb in row_blocks.clone() {
                        let a_tiles = &packed_a[mb * step..(mb + 1) * step];
                        // SAFETY: AMX is available and configured on this thread (`_tiles`);
                        // both operands hold `chunks` steps of two tiles; `block` is 32 × 32.
                        unsafe { block_product(&mut block, a_tiles, b_tiles, chunks) };
                        let rows = (m - mb * BLOCK).min(BLOCK);
                        let cols = (n - nb * BLOCK).min(BLOCK);
                        for r in 0..rows {
                            let at = (mb * BLOCK + r) * n + nb * BLOCK;
                            // SAFETY: row mb·32 + r, columns nb·32 .. +cols are inside the
                            // m × n result, and only this task writes column block nb.
                            let cells = unsafe {
                                std::slice::from_raw_parts_mut(dst_ptr.get().add(at), cols)
                            };
                            let values = &block[r * BLOCK..r * BLOCK + cols];
                            match acc {
                                Accumulate::Overwrite => cells.copy_from_slice(values),
                                Accumulate::Add => {
                                    cells.iter_mut().zip(values).for_each(|(c, v)| *c += v)
                                }
                            }
                        }
                    }
                })
        }
    });
}

/// A raw pointer the tasks share (each writes its own cells).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks of `gemm_bf16` write disjoint cells through it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Packs `blocks` blocks of 32 outer indices × (chunks · 32) inner values of `m` (outer = its
/// rows, or with `by_column` its columns) into bfloat16 tiles, zero-padded: for each block,
/// each 32-value chunk, two tiles of 16 outer indices. A tile of A holds outer r's 32 values
/// at 32·r; a tile of B (`pairs`) holds inner pair p of outer c at 32·p + 2·c.
fn pack(m: MatRef, by_column: bool, blocks: usize, chunks: usize, pairs: bool) -> Vec<u16> {
    let (outer_len, inner_len) = if by_column {
        (m.cols(), m.rows())
    } else {
        (m.rows(), m.cols())
    };
    let (outer_stride, inner_stride) = if by_column {
        (m.col_stride(), m.row_stride())
    } else {
        (m.row_stride(), m.col_stride())
    };
    let data = m.data();
    let mut packed = vec![0u16; blocks * chunks * 2 * TILE];
    packed
        .par_chunks_mut(2 * TILE)
        .enumerate()
        .for_each(|(step, tiles)| {
            let (block, chunk) = (step / chunks, step % chunks);
            let inner0 = chunk * BLOCK;
            let inners = inner_len.saturating_sub(inner0).min(BLOCK);
            let place = |row: usize, i: usize| {
                if pairs {
                    (i / 2) * 32 + row * 2 + i % 2
                } else {
                    row * 32 + i
                }
            };
            for (half, tile) in tiles.chunks_exact_mut(TILE).enumerate() {
                let outer0 = block * BLOCK + half * 16;
                let outers = outer_len.saturating_sub(outer0).min(16);
                let base = outer0 * outer_stride + inner0 * inner_stride;
                // Read along whichever index is contiguous in memory.
                if inner_stride == 1 {
                    for row in 0..outers {
                        let from = &data[base + row * outer_stride..][..inners];
                        for (i, &v) in from.iter().enumerate() {
                            tile[place(row, i)] = bf16_bits(v);
                        }
                    }
                } else {
                    for i in 0..inners {
                        for row in 0..outers {
                            let v = data[base + i * inner_stride + row * outer_stride];
                            tile[place(row, i)] = bf16_bits(v);
                        }
                    }
                }
            }
        });
    packed
}

/// The 64-byte tile configuration: every tile 16 rows of 64 bytes. Loaded on construction,
/// released (`tilerelease`) on drop, on the thread that uses the tiles.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn load() -> TileGuard {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        // SAFETY: AMX is available (checked by the caller) and cfg is a valid palette-1
        // configuration, 64-byte aligned.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack));
        }
        TileGuard
    }
}

struct TileGuard;

impl Drop for TileGuard {
    fn drop(&mut self) {
        // SAFETY: releases the tile state configured by `TileConfig::load` on this thread.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// One 32 × 32 block of the result: `chunks` steps of A's two row tiles times B's two column
/// tiles, accumulated in tiles 0–3 and stored into `block` (row-major, 32 wide).
unsafe fn block_product(block: &mut [f32; BLOCK * BLOCK], a: &[u16], b: &[u16], chunks: usize) {
    use std::arch::asm;
    debug_assert!(a.len() >= chunks * 2 * TILE && b.len() >= chunks * 2 * TILE);
    let stride = 64usize;
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for chunk in 0..chunks {
        let (a0, b0) = (
            a.as_ptr().add(chunk * 2 * TILE),
            b.as_ptr().add(chunk * 2 * TILE),
        );
        let (a1, b1) = (a0.add(TILE), b0.add(TILE));
        asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) a1,
            b0 = in(reg) b0,
            b1 = in(reg) b1,
            s = in(reg) stride,
            options(nostack, readonly),
        );
    }
    let out = block.as_mut_ptr();
    let row_bytes = BLOCK * 4;
    asm!(
        "tilestored [{c00} + {s}*1], tmm0",
        "tilestored [{c01} + {s}*1], tmm1",
        "tilestored [{c10} + {s}*1], tmm2",
        "tilestored [{c11} + {s}*1], tmm3",
        c00 = in(reg) out,
        c01 = in(reg) out.add(16),
        c10 = in(reg) out.add(16 * BLOCK),
        c11 = in(reg) out.add(16 * BLOCK + 16),
        s = in(reg) row_bytes,
        options(nostack),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::{gemm, Threads};
    use crate::model::DType;

    /// Against the float32 product of the rounded operands: the same products, summed in
    /// another order, for shapes with and without whole tiles and for transposed views.
    #[test]
    fn products_equal_float32_of_the_rounded_operands() {
        if !available() {
            // Without AMX the product refuses to run (callers check `available()` first).
            let refused = std::panic::catch_unwind(|| {
                gemm_bf16(
                    &mut [0.0],
                    MatRef::new(&[1.0], 1, 1),
                    MatRef::new(&[1.0], 1, 1),
                    Accumulate::Overwrite,
                )
            });
            assert!(refused.is_err());
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (16, 32, 16),
            (33, 70, 45),
            (64, 768, 96),
            (5, 300, 130),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.0131)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.0173)
                .collect();
            let round = |v: &[f32]| {
                let mut r = v.to_vec();
                DType::Bfloat16.round_slice(&mut r);
                r
            };
            let (ra, rb) = (round(&a), round(&b));
            let mut want = vec![0.0f32; m * n];
            gemm(
                &mut want,
                MatRef::new(&ra, m, k),
                MatRef::new(&rb, k, n),
                Accumulate::Overwrite,
                Threads::Pool,
            );
            let mut got = vec![1.0f32; m * n];
            gemm_bf16(
                &mut got,
                MatRef::new(&a, m, k),
                MatRef::new(&b, k, n),
                Accumulate::Overwrite,
            );
            let scale = want.iter().fold(1.0f32, |s, v| s.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * scale * (k as f32).sqrt(),
                    "{m}x{k}x{n}: {g} vs {w}"
                );
            }
            // Transposed views and accumulation: got += aᵀᵀ · (bᵀ)ᵀ.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            gemm_bf16(
                &mut got,
                MatRef::new(&a, m, k),
                MatRef::transposed(&bt, k, n),
                Accumulate::Add,
            );
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - 2.0 * w).abs() <= 2e-5 * scale * (k as f32).sqrt(),
                    "{m}x{k}x{n}: {g} vs 2×{w}"
                );
            }
        }
    }
}
