//! Tensor kernels. Each forward sits next to its backward; shapes are stated at the top of
//! each file.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod cross_entropy;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
#[cfg(target_arch = "x86_64")]
mod gemm_avx2;
pub mod layernorm;
pub mod linear;
pub mod matmul;
pub mod rotary;
pub mod softmax;

#[cfg(test)]
pub(crate) mod gradcheck;
