//! Values on the wire: the extension's float32 tensor format (little-endian `bytea`) and
//! token batches as two-dimensional `int[]` parameters.

use bytes::BytesMut;
use postgres_protocol::types as protocol;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use crate::Error;

/// Encodes float32 values in the extension's tensor format (little-endian bytes).
pub fn encode(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes the extension's tensor format.
pub fn decode(bytes: &[u8]) -> Result<Vec<f32>, Error> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::Protocol(format!(
            "tensor of {} bytes is not float32",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Token ids of one sequence or of a batch of equal-length sequences, sent as an `int[]`
/// with the batch's shape (one row: a 1-D array; several: a 2-D array). Made from a slice
/// (one sequence) or an `ndarray` matrix (one sequence per row).
///
/// ```
/// use pg_gpt3_client::Tokens;
/// let one: Tokens = (&[464, 3290][..]).into();
/// let batch = ndarray::arr2(&[[464, 3290], [50256, 11]]);
/// let two: Tokens = (&batch).into();
/// assert_eq!((one.rows(), two.rows()), (1, 2));
/// ```
#[derive(Debug, Clone)]
pub struct Tokens<'a>(ndarray::ArrayView2<'a, i32>);

impl Tokens<'_> {
    /// Sequences in the batch.
    pub fn rows(&self) -> usize {
        self.0.nrows()
    }
}

impl<'a> From<&'a [i32]> for Tokens<'a> {
    fn from(ids: &'a [i32]) -> Self {
        Tokens(ndarray::ArrayView2::from_shape((1, ids.len()), ids).expect("one row"))
    }
}

impl<'a> From<&'a Vec<i32>> for Tokens<'a> {
    fn from(ids: &'a Vec<i32>) -> Self {
        ids.as_slice().into()
    }
}

impl<'a> From<ndarray::ArrayView2<'a, i32>> for Tokens<'a> {
    fn from(ids: ndarray::ArrayView2<'a, i32>) -> Self {
        Tokens(ids)
    }
}

impl<'a> From<&'a ndarray::Array2<i32>> for Tokens<'a> {
    fn from(ids: &'a ndarray::Array2<i32>) -> Self {
        Tokens(ids.view())
    }
}

impl ToSql for Tokens<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let (rows, len) = self.0.dim();
        let dims: Vec<protocol::ArrayDimension> = if rows == 1 {
            vec![len]
        } else {
            vec![rows, len]
        }
        .into_iter()
        .map(|n| {
            Ok(protocol::ArrayDimension {
                len: i32::try_from(n)?,
                lower_bound: 1,
            })
        })
        .collect::<Result<_, std::num::TryFromIntError>>()?;
        let element = match ty.kind() {
            tokio_postgres::types::Kind::Array(element) => element.oid(),
            _ => return Err("a token batch is an int[]".into()),
        };
        protocol::array_to_sql(
            dims,
            element,
            self.0.iter(),
            |id, buf| {
                protocol::int4_to_sql(*id, buf);
                Ok(postgres_protocol::IsNull::No)
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::INT4_ARRAY
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_format_round_trips() {
        let v = vec![1.0f32, -0.5, 3.25];
        assert_eq!(decode(&encode(&v)).unwrap(), v);
        assert_eq!(encode(&[1.0]), vec![0x00, 0x00, 0x80, 0x3f]);
        assert!(decode(&[0, 1, 2]).is_err());
    }

    #[test]
    fn token_batches_carry_their_shape() {
        let ids = ndarray::arr2(&[[1, 2, 3], [4, 5, 6]]);
        let mut buf = BytesMut::new();
        Tokens(ids.view())
            .to_sql(&Type::INT4_ARRAY, &mut buf)
            .unwrap();
        // Binary array header: ndim, has-nulls flag, element type, then (length, lower bound)
        // per dimension, then each element as (length 4, value).
        let word = |k: usize| i32::from_be_bytes(buf[4 * k..4 * k + 4].try_into().unwrap());
        assert_eq!((word(0), word(1), word(2) as u32), (2, 0, Type::INT4.oid()));
        assert_eq!((word(3), word(4), word(5), word(6)), (2, 1, 3, 1));
        assert_eq!((word(7), word(8), word(17), word(18)), (4, 1, 4, 6));
    }
}
