//! The key/value cache of incremental decoding, and the attention layout (positions and mask) of
//! a batch whose rows hold different numbers of real tokens.
//!
//! Rows may be padded anywhere (left padding of prompts, or a finished row fed pad tokens): a slot
//! with mask 0 is never attended to by another token, and real tokens get consecutive positions
//! per row (`position = number of real tokens before it in the row`), which is what transformers'
//! `generate` passes as `position_ids` (cumsum of the mask minus one). So a padded row computes the
//! same thing as the same row alone without padding.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Keys and values of every layer for a batch of rows, plus which cached slots hold real tokens.
/// The cache grows by concatenation along the sequence axis; a later preallocated in-place cache
/// can replace it behind the same methods.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values, each (B, H_kv, S, D).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per row: whether each of the S cached slots is a real token.
    real: Vec<Vec<bool>>,
    /// Per row: the position the next real token gets.
    next_position: Vec<u32>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            real: vec![],
            next_position: vec![],
        }
    }

    /// Number of cached slots per row (real or padding).
    pub fn seq_len(&self) -> usize {
        self.real.first().map_or(0, Vec::len)
    }

    /// Number of layers the cache was made for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of rows, 0 while empty.
    pub fn batch_size(&self) -> usize {
        self.real.len()
    }

    /// Per row: the position the next real token gets (= its number of real tokens so far).
    pub fn next_positions(&self) -> &[u32] {
        &self.next_position
    }

    /// Forgets everything (the cache can be reused for a new batch).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|layer| *layer = None);
        self.real.clear();
        self.next_position.clear();
    }

    /// Keeps rows `rows` of the cache, in that order; an index may repeat. Repeating row 0 `G` times
    /// turns one prefilled prompt into a group's `G` rows (prefix sharing); leaving rows out drops
    /// finished ones so no more compute is spent on them.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let batch = self.batch_size();
        if let Some(&bad) = rows.iter().find(|&&r| r >= batch) {
            return Err(Error::msg(format!(
                "KV cache has {batch} rows, row {bad} was selected"
            )));
        }
        if rows.is_empty() {
            self.clear();
            return Ok(());
        }
        let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let mut selected = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            selected.push(match layer {
                Some((k, v)) => {
                    let index = Tensor::new(index.as_slice(), k.device())?;
                    Some((k.index_select(&index, 0)?, v.index_select(&index, 0)?))
                    // (B', H_kv, S, D)
                }
                None => None,
            });
        }
        self.layers = selected;
        self.real = rows.iter().map(|&r| self.real[r].clone()).collect();
        self.next_position = rows.iter().map(|&r| self.next_position[r]).collect();
        Ok(())
    }

    /// Appends this step's keys and values (B, H_kv, T, D) to layer `layer`; returns all of them.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::msg(format!("KV cache has no layer {layer}")))?;
        let (k, v) = match slot.take() {
            None => (k.clone(), v.clone()),
            Some((k_past, v_past)) => (
                Tensor::cat(&[&k_past, k], 2)?,
                Tensor::cat(&[&v_past, v], 2)?,
            ),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Registers a step of `new_real` (B rows x T tokens) and returns its attention layout.
    /// Call once per step before running the layers.
    pub(crate) fn begin_step(&mut self, new_real: &[Vec<bool>], device: &Device) -> Result<Layout> {
        if !self.real.is_empty() && self.real.len() != new_real.len() {
            return Err(Error::msg(format!(
                "KV cache holds {} rows, the step has {}",
                self.real.len(),
                new_real.len()
            )));
        }
        if self.real.is_empty() {
            self.real = vec![vec![]; new_real.len()];
            self.next_position = vec![0; new_real.len()];
        }
        let layout = Layout::build(&self.real, &self.next_position, new_real, device)?;
        for ((row, next), new_row) in self
            .real
            .iter_mut()
            .zip(&mut self.next_position)
            .zip(new_real)
        {
            row.extend_from_slice(new_row);
            *next += new_row.iter().filter(|&&r| r).count() as u32;
        }
        Ok(layout)
    }
}

/// Positions and additive attention mask of one forward step.
pub(crate) struct Layout {
    /// (B, T) f32 positions of the step's tokens.
    pub positions: Tensor,
    /// (B, 1, 1, T, S) f32: 0 where a query may attend a key, -inf elsewhere (S = past + T).
    /// The two singleton axes broadcast over KV heads and the query heads sharing one.
    pub mask: Tensor,
}

impl Layout {
    /// Query i of row b (slot `past + i`) attends key j when j is itself, or j is a real token at
    /// or before it. Each query row so keeps at least one finite score (no NaN on pad queries),
    /// and real tokens never see padding.
    fn build(
        past_real: &[Vec<bool>],
        past_next: &[u32],
        new_real: &[Vec<bool>],
        device: &Device,
    ) -> Result<Self> {
        let batch = new_real.len();
        let steps = new_real.first().map_or(0, Vec::len);
        let past = past_real.first().map_or(0, Vec::len);
        let keys = past + steps;
        let mut positions = Vec::with_capacity(batch * steps);
        let mut mask = vec![f32::NEG_INFINITY; batch * steps * keys];
        for b in 0..batch {
            let mut next = past_next[b];
            for i in 0..steps {
                positions.push(next as f32);
                if new_real[b][i] {
                    next += 1;
                }
                let query_slot = past + i;
                let row = &mut mask[(b * steps + i) * keys..(b * steps + i + 1) * keys];
                for (j, score) in row.iter_mut().enumerate().take(query_slot + 1) {
                    let key_real = if j < past {
                        past_real[b][j]
                    } else {
                        new_real[b][j - past]
                    };
                    if key_real || j == query_slot {
                        *score = 0.0;
                    }
                }
            }
        }
        Ok(Self {
            positions: Tensor::from_vec(positions, (batch, steps), device)?,
            mask: Tensor::from_vec(mask, (batch, 1, 1, steps, keys), device)?,
        })
    }
}

/// Reads a (B, T) attention mask (1 = token, 0 = padding, any dtype) into per-row flags;
/// `None` means every token is real.
pub(crate) fn mask_rows(
    mask: Option<&Tensor>,
    batch: usize,
    steps: usize,
) -> Result<Vec<Vec<bool>>> {
    let Some(mask) = mask else {
        return Ok(vec![vec![true; steps]; batch]);
    };
    if mask.dims() != [batch, steps] {
        return Err(Error::msg(format!(
            "attention mask has shape {:?}, the input is ({batch}, {steps})",
            mask.dims()
        )));
    }
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .map(|row| row.into_iter().map(|m| m != 0.0).collect())
        .collect())
}
