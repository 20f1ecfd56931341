//! The key/value cache of incremental decoding, and the attention layout (positions and mask) of
//! a batch whose rows hold different numbers of real tokens.
//!
//! Rows may be padded anywhere (left padding of prompts, a finished row fed pad tokens, or rows that
//! joined a running batch later: [`KvCache::append_rows`]): a slot with mask 0 is never attended to
//! by another token, and real tokens get consecutive positions per row (`position = number of real
//! tokens before it in the row`), which is what transformers' `generate` passes as `position_ids`
//! (cumsum of the mask minus one). So a padded row computes the same thing as the same row alone
//! without padding.
//!
//! Storage: per layer one preallocated key and one value buffer (B, H_kv, capacity, D). A step writes
//! its keys and values in place at the next free slots; attention reads only the filled slots (a
//! view, no copy). The capacity doubles when full, so a response of N tokens costs O(log N)
//! reallocations instead of a full copy per token.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Capacity (slots) of a layer buffer when it is first allocated, at least.
const MIN_CAPACITY: usize = 64;

/// One layer's key and value buffers, each (B, H_kv, capacity, D), contiguous; slots past the
/// cache's `seq_len` are unused.
#[derive(Debug)]
struct LayerBuffers {
    k: Tensor,
    v: Tensor,
}

impl LayerBuffers {
    fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// An independent copy (the buffers are written in place, so clones must not share them).
    fn deep_copy(&self) -> Result<Self> {
        Ok(Self {
            k: self.k.copy()?,
            v: self.v.copy()?,
        })
    }
}

/// `data` (B, H, L, D) laid into a fresh contiguous (B, H, capacity, D) buffer at slots
/// `[left, left + L)`, zeros elsewhere.
fn place(data: &Tensor, left: usize, capacity: usize) -> Result<Tensor> {
    let (b, h, len, d) = data.dims4()?;
    let right = capacity - left - len;
    let mut parts = Vec::with_capacity(3);
    if left > 0 {
        parts.push(Tensor::zeros((b, h, left, d), data.dtype(), data.device())?);
    }
    parts.push(data.clone());
    if right > 0 {
        parts.push(Tensor::zeros(
            (b, h, right, d),
            data.dtype(),
            data.device(),
        )?);
    }
    Ok(Tensor::cat(&parts, 2)?.contiguous()?) // (B, H, capacity, D)
}

/// Keys and values of every layer for a batch of rows, plus which cached slots hold real tokens.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: the preallocated buffers, `None` until the first step.
    layers: Vec<Option<LayerBuffers>>,
    /// Per row: whether each of the S cached slots is a real token.
    real: Vec<Vec<bool>>,
    /// Per row: the position the next real token gets.
    next_position: Vec<u32>,
    /// Slots to allocate at least when a layer's buffers are first created.
    reserved: usize,
}

impl Clone for KvCache {
    /// A deep copy: the buffers are written in place, so two caches never share them.
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                layer.as_ref().map(|buffers| {
                    // A CPU/GPU copy of an existing tensor of the same shape and dtype only fails
                    // when the device runs out of memory, which Clone cannot report.
                    buffers
                        .deep_copy()
                        .expect("KV cache clone: copying buffers failed")
                })
            })
            .collect();
        Self {
            layers,
            real: self.real.clone(),
            next_position: self.next_position.clone(),
            reserved: self.reserved,
        }
    }
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            real: vec![],
            next_position: vec![],
            reserved: 0,
        }
    }

    /// Number of cached slots per row (real or padding).
    pub fn seq_len(&self) -> usize {
        self.real.first().map_or(0, Vec::len)
    }

    /// Slots the buffers hold before they must grow (0 before the first step).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(0, LayerBuffers::capacity)
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

    /// Sets the position each row's next real token gets (one per row). A model whose prompt positions are
    /// not the real-token count (Qwen2.5-VL's multimodal RoPE) continues its decode steps from there.
    pub fn set_next_positions(&mut self, next: &[u32]) -> Result<()> {
        if next.len() != self.batch_size() {
            return Err(Error::msg(format!(
                "KV cache holds {} rows, {} next positions were given",
                self.batch_size(),
                next.len()
            )));
        }
        self.next_position = next.to_vec();
        Ok(())
    }

    /// Per row: whether each cached slot holds a real token (`false`: padding).
    pub fn real_slots(&self) -> &[Vec<bool>] {
        &self.real
    }

    /// Makes room for `slots` slots in all (filled or not) without reallocating: grows the
    /// buffers now if they exist, else sizes them when the first step allocates them.
    pub fn reserve(&mut self, slots: usize) -> Result<()> {
        self.reserved = self.reserved.max(slots);
        let filled = self.seq_len();
        for buffers in self.layers.iter_mut().flatten() {
            if buffers.capacity() < slots {
                buffers.k = place(&buffers.k.narrow(2, 0, filled)?, 0, slots)?;
                buffers.v = place(&buffers.v.narrow(2, 0, filled)?, 0, slots)?;
            }
        }
        Ok(())
    }

    /// Forgets everything (the cache can be reused for a new batch).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|layer| *layer = None);
        self.real.clear();
        self.next_position.clear();
    }

    /// Keeps rows `rows` of the cache, in that order; an index may repeat. Repeating row 0 `G` times
    /// turns one prefilled prompt into a group's `G` rows (prefix sharing); leaving rows out drops
    /// finished ones so no more compute is spent on them. Leading slots that are padding in every
    /// kept row are dropped too.
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
        let filled = self.seq_len();
        // The first slot that some kept row uses; earlier slots are padding everywhere.
        let first = rows
            .iter()
            .filter_map(|&r| self.real[r].iter().position(|&real| real))
            .min()
            .unwrap_or(0);
        let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        for buffers in self.layers.iter_mut().flatten() {
            let index = Tensor::new(index.as_slice(), buffers.k.device())?;
            let capacity = buffers.capacity();
            for buffer in [&mut buffers.k, &mut buffers.v] {
                let kept = buffer.index_select(&index, 0)?; // (B', H_kv, capacity, D)
                *buffer = if first == 0 {
                    kept
                } else {
                    place(&kept.narrow(2, first, filled - first)?, 0, capacity)?
                };
            }
        }
        self.real = rows
            .iter()
            .map(|&r| self.real[r][first..].to_vec())
            .collect();
        self.next_position = rows.iter().map(|&r| self.next_position[r]).collect();
        Ok(())
    }

    /// Appends the rows of `other` after this cache's rows (continuous batching: a prefilled
    /// group joins a running batch). The shorter side is left-padded with padding slots so every
    /// row ends at the same slot; each row keeps its own positions.
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if other.num_layers() != self.num_layers() {
            return Err(Error::msg(format!(
                "KV cache append_rows: caches made for {} and {} layers",
                self.num_layers(),
                other.num_layers()
            )));
        }
        if other.batch_size() == 0 {
            return Ok(());
        }
        if self.batch_size() == 0 {
            *self = other;
            return Ok(());
        }
        let (ours, theirs) = (self.seq_len(), other.seq_len());
        let filled = ours.max(theirs);
        let capacity = self.capacity().max(other.capacity()).max(filled);
        for (layer, (mine, joining)) in self.layers.iter_mut().zip(other.layers).enumerate() {
            let (Some(mine), Some(joining)) = (mine.as_mut(), joining) else {
                return Err(Error::msg(format!(
                    "KV cache append_rows: layer {layer} is empty on one side"
                )));
            };
            for (buffer, new) in [(&mut mine.k, joining.k), (&mut mine.v, joining.v)] {
                let a = place(&buffer.narrow(2, 0, ours)?, filled - ours, capacity)?;
                let b = place(&new.narrow(2, 0, theirs)?, filled - theirs, capacity)?;
                *buffer = Tensor::cat(&[&a, &b], 0)?; // (B + B', H_kv, capacity, D)
            }
        }
        let pad_rows = |rows: Vec<Vec<bool>>, len: usize| {
            rows.into_iter().map(move |row| {
                let mut padded = vec![false; filled - len];
                padded.extend(row);
                padded
            })
        };
        let real = std::mem::take(&mut self.real);
        self.real = pad_rows(real, ours)
            .chain(pad_rows(other.real, theirs))
            .collect();
        self.next_position.extend(other.next_position);
        self.reserved = self.reserved.max(other.reserved);
        Ok(())
    }

    /// Writes this step's keys and values (B, H_kv, T, D) of layer `layer` in place after the
    /// filled slots (registered by [`Self::begin_step`]); returns views of all filled slots
    /// (B, H_kv, S, D) (no copy).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let filled = self.seq_len(); // begin_step already counted this step's slots
        let reserved = self.reserved;
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::msg(format!("KV cache has no layer {layer}")))?;
        let steps = k.dim(2)?;
        let start = filled.checked_sub(steps).ok_or_else(|| {
            Error::msg(format!(
                "KV cache: a step of {steps} tokens, only {filled} slots registered"
            ))
        })?;
        let buffers = match slot {
            Some(buffers) => {
                if buffers.capacity() < filled {
                    let capacity = (2 * buffers.capacity()).max(filled);
                    buffers.k = place(&buffers.k.narrow(2, 0, start)?, 0, capacity)?;
                    buffers.v = place(&buffers.v.narrow(2, 0, start)?, 0, capacity)?;
                }
                buffers
            }
            None if start == 0 => {
                let capacity = filled.max(reserved).max(MIN_CAPACITY);
                slot.insert(LayerBuffers {
                    k: place(&k.narrow(2, 0, 0)?, 0, capacity)?,
                    v: place(&v.narrow(2, 0, 0)?, 0, capacity)?,
                })
            }
            None => {
                return Err(Error::msg(format!(
                    "KV cache layer {layer} is empty but {start} slots are registered \
                     (a failed step? clear the cache)"
                )))
            }
        };
        buffers.k.slice_set(&k.contiguous()?, 2, start)?;
        buffers.v.slice_set(&v.contiguous()?, 2, start)?;
        Ok((
            buffers.k.narrow(2, 0, filled)?,
            buffers.v.narrow(2, 0, filled)?,
        ))
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

/// The layouts of a prefix-shared forward (see [`super::qwen2::Model::forward_prefixed`]): the prompts
/// (Bp rows of `prompt_real`) alone, and the responses (B rows of `response_real`) with row b's prompt,
/// `prompt_real[prompt_of[b]]`, as its past (the prompt's padding slots masked like any other).
pub(crate) fn prefixed_layouts(
    prompt_real: &[Vec<bool>],
    response_real: &[Vec<bool>],
    prompt_of: &[usize],
    device: &Device,
) -> Result<(Layout, Layout)> {
    if prompt_of.len() != response_real.len() {
        return Err(Error::msg(format!(
            "prefix-shared forward: {} responses, {} prompt indices",
            response_real.len(),
            prompt_of.len()
        )));
    }
    if let Some(&bad) = prompt_of.iter().find(|&&g| g >= prompt_real.len()) {
        return Err(Error::msg(format!(
            "prefix-shared forward: prompt index {bad}, only {} prompts",
            prompt_real.len()
        )));
    }
    let none = vec![Vec::new(); prompt_real.len()];
    let prompts = Layout::build(&none, &vec![0; prompt_real.len()], prompt_real, device)?;
    let past: Vec<Vec<bool>> = prompt_of.iter().map(|&g| prompt_real[g].clone()).collect();
    let next: Vec<u32> = past
        .iter()
        .map(|row| row.iter().filter(|&&r| r).count() as u32)
        .collect();
    let responses = Layout::build(&past, &next, response_real, device)?;
    Ok((prompts, responses))
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
