//! The running rows' KV cache, cut into shards that decode concurrently (CPU data parallelism over rows).
//!
//! A decode step of many rows is a chain of small matmuls; splitting each of them across threads costs a
//! fork-join (and often a wake-up) per op, and the threads wait on each other at every one. With shards, each
//! thread runs whole forward passes for its own rows, and the threads meet once per step. Few rows stay in one
//! shard: that step is bound by reading the weights, which the per-op split shares between the threads
//! instead of reading them once per shard.
//!
//! Rows keep their global order (the engine's): row `i` lives at `rows[i] = (shard, local row)`. Joining
//! groups go to the shards with the fewest rows; after rows leave, shards are merged or rows moved to keep
//! the split even. A row's tokens do not depend on its shard (each row's logits depend on its own cache only).

use crate::model::kv_cache::KvCache;
use crate::{Error, Result};

/// How many shards a number of running rows is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardPlan {
    /// At most this many shards (the compute threads).
    pub max_shards: usize,
    /// A shard gets at least this many rows (fewer rows: fewer shards).
    pub min_rows_per_shard: usize,
}

impl ShardPlan {
    /// One shard whatever the rows.
    pub fn single() -> Self {
        Self {
            max_shards: 1,
            min_rows_per_shard: 1,
        }
    }

    /// One shard per compute thread of candle's CPU pool, each of at least 16 rows (below that the packed
    /// matmul's 12-row register blocks run part-empty and weight reads dominate).
    pub fn for_cpu() -> Self {
        Self {
            max_shards: candle_core::utils::get_num_threads().max(1),
            min_rows_per_shard: 16,
        }
    }

    /// Shards for `rows` running rows.
    pub fn shards_for(&self, rows: usize) -> usize {
        (rows / self.min_rows_per_shard.max(1)).clamp(1, self.max_shards.max(1))
    }

    /// Largest allowed difference between the biggest and the smallest shard before rows move.
    fn slack(&self) -> usize {
        (self.min_rows_per_shard / 2).max(1)
    }
}

/// A KV cache in shards; see the module doc.
#[derive(Debug, Clone)]
pub struct ShardedCache {
    shards: Vec<KvCache>,
    /// Global row -> (shard, row within the shard).
    rows: Vec<(usize, usize)>,
    plan: ShardPlan,
}

impl ShardedCache {
    /// One shard holding `cache` (a prefilled group), split further when it joins a batch.
    pub fn single(cache: KvCache, plan: ShardPlan) -> Self {
        let rows = (0..cache.batch_size()).map(|r| (0, r)).collect();
        Self {
            shards: vec![cache],
            rows,
            plan,
        }
    }

    /// Running rows.
    pub fn batch_size(&self) -> usize {
        self.rows.len()
    }

    /// `per_row` (global order) cut into each shard's rows, in the shard's order.
    pub fn scatter<T: Clone>(&self, per_row: &[T]) -> Result<Vec<Vec<T>>> {
        if per_row.len() != self.rows.len() {
            return Err(Error::msg(format!(
                "sharded KV cache: {} values for {} rows",
                per_row.len(),
                self.rows.len()
            )));
        }
        let mut out: Vec<Vec<Option<T>>> = self
            .shards
            .iter()
            .map(|s| vec![None; s.batch_size()])
            .collect();
        for (&(shard, local), value) in self.rows.iter().zip(per_row) {
            out[shard][local] = Some(value.clone());
        }
        out.into_iter()
            .map(|shard| {
                shard
                    .into_iter()
                    .map(|v| {
                        v.ok_or_else(|| {
                            Error::msg("sharded KV cache: a shard row has no global row")
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Per-shard results (each in its shard's row order) back into global row order.
    pub fn gather<T>(&self, per_shard: Vec<Vec<T>>) -> Result<Vec<T>> {
        let mut slots: Vec<Vec<Option<T>>> = per_shard
            .into_iter()
            .map(|shard| shard.into_iter().map(Some).collect())
            .collect();
        self.rows
            .iter()
            .map(|&(shard, local)| {
                slots
                    .get_mut(shard)
                    .and_then(|s| s.get_mut(local))
                    .and_then(Option::take)
                    .ok_or_else(|| {
                        Error::msg(format!(
                            "sharded KV cache: no result for row {local} of shard {shard}"
                        ))
                    })
            })
            .collect()
    }

    /// The shards, to run a step on each; [`Self::scatter`] and [`Self::gather`] convert between row orders.
    pub fn shards_mut(&mut self) -> &mut [KvCache] {
        &mut self.shards
    }

    /// Keeps global rows `keep`, in that order (an index may repeat), as [`KvCache::select_rows`].
    pub fn select_rows(&mut self, keep: &[usize]) -> Result<()> {
        let total = self.rows.len();
        if let Some(&bad) = keep.iter().find(|&&r| r >= total) {
            return Err(Error::msg(format!(
                "KV cache has {total} rows, row {bad} was selected"
            )));
        }
        let mut local: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
        let rows: Vec<(usize, usize)> = keep
            .iter()
            .map(|&g| {
                let (shard, row) = self.rows[g];
                local[shard].push(row);
                (shard, local[shard].len() - 1)
            })
            .collect();
        for (shard, keep) in self.shards.iter_mut().zip(&local) {
            let unchanged =
                keep.len() == shard.batch_size() && keep.iter().enumerate().all(|(i, &r)| i == r);
            if !unchanged {
                shard.select_rows(keep)?;
            }
        }
        self.rows = rows;
        self.drop_empty_shards();
        self.rebalance()
    }

    /// Appends the rows of `joining` after the running rows, spread over the shards with the fewest rows.
    pub fn append_rows(&mut self, joining: ShardedCache) -> Result<()> {
        if joining.batch_size() == 0 {
            return Ok(());
        }
        let joining = joining.into_single()?;
        let incoming = joining.batch_size();
        let target = self.plan.shards_for(self.rows.len() + incoming);
        while self.shards.len() < target {
            self.shards.push(KvCache::new(joining.num_layers()));
        }
        // Each joining row goes to the currently smallest shard.
        let mut sizes: Vec<usize> = self.shards.iter().map(KvCache::batch_size).collect();
        let mut assigned: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
        for row in 0..incoming {
            let shard = (0..sizes.len()).min_by_key(|&s| (sizes[s], s)).unwrap_or(0); // shards non-empty
            self.rows.push((shard, sizes[shard]));
            sizes[shard] += 1;
            assigned[shard].push(row);
        }
        let receiving = assigned.iter().filter(|a| !a.is_empty()).count();
        let mut joining = Some(joining);
        for (shard, rows) in self.shards.iter_mut().zip(&assigned) {
            if rows.is_empty() {
                continue;
            }
            let part = if receiving == 1 {
                joining
                    .take()
                    .ok_or_else(|| Error::msg("sharded KV cache: joining rows used twice"))?
            } else {
                let mut part = joining
                    .as_ref()
                    .ok_or_else(|| Error::msg("sharded KV cache: joining rows used twice"))?
                    .clone();
                part.select_rows(rows)?;
                part
            };
            shard.append_rows(part)?;
        }
        self.drop_empty_shards();
        Ok(())
    }

    /// All rows in one `KvCache`, in global order.
    fn into_single(mut self) -> Result<KvCache> {
        let in_order =
            self.shards.len() == 1 && self.rows.iter().enumerate().all(|(i, &(_, r))| i == r);
        if in_order {
            return self
                .shards
                .pop()
                .ok_or_else(|| Error::msg("sharded KV cache: no shard"));
        }
        let mut offsets = Vec::with_capacity(self.shards.len());
        let mut merged: Option<KvCache> = None;
        for shard in self.shards {
            let start = merged.as_ref().map_or(0, KvCache::batch_size);
            offsets.push(start);
            match merged.as_mut() {
                Some(m) => m.append_rows(shard)?,
                None => merged = Some(shard),
            }
        }
        let mut merged = merged.ok_or_else(|| Error::msg("sharded KV cache: no shard"))?;
        let order: Vec<usize> = self.rows.iter().map(|&(s, r)| offsets[s] + r).collect();
        merged.select_rows(&order)?;
        Ok(merged)
    }

    fn drop_empty_shards(&mut self) {
        let mut remap = vec![usize::MAX; self.shards.len()];
        let mut kept = Vec::with_capacity(self.shards.len());
        for (s, shard) in std::mem::take(&mut self.shards).into_iter().enumerate() {
            if shard.batch_size() > 0 {
                remap[s] = kept.len();
                kept.push(shard);
            }
        }
        self.shards = kept;
        for row in &mut self.rows {
            row.0 = remap[row.0];
        }
    }

    /// Merges shards beyond what the rows need, then moves rows from the largest shard to the smallest
    /// while they differ by more than the plan's slack.
    fn rebalance(&mut self) -> Result<()> {
        let target = self.plan.shards_for(self.rows.len());
        while self.shards.len() > target {
            let last = self.shards.len() - 1;
            let into = (0..last)
                .min_by_key(|&s| (self.shards[s].batch_size(), s))
                .unwrap_or(0); // at least two shards here
            let moved = self
                .shards
                .pop()
                .ok_or_else(|| Error::msg("sharded KV cache: no shard"))?;
            let offset = self.shards[into].batch_size();
            self.shards[into].append_rows(moved)?;
            for row in &mut self.rows {
                if row.0 == last {
                    *row = (into, offset + row.1);
                }
            }
        }
        loop {
            let sizes: Vec<usize> = self.shards.iter().map(KvCache::batch_size).collect();
            let (Some(big), Some(small)) = (
                (0..sizes.len()).max_by_key(|&s| (sizes[s], usize::MAX - s)),
                (0..sizes.len()).min_by_key(|&s| (sizes[s], s)),
            ) else {
                return Ok(());
            };
            if sizes[big] - sizes[small] <= self.plan.slack() {
                return Ok(());
            }
            let count = (sizes[big] - sizes[small]) / 2;
            let stay = sizes[big] - count;
            let mut moving = self.shards[big].clone();
            moving.select_rows(&(stay..sizes[big]).collect::<Vec<_>>())?;
            self.shards[big].select_rows(&(0..stay).collect::<Vec<_>>())?;
            self.shards[small].append_rows(moving)?;
            for row in &mut self.rows {
                if row.0 == big && row.1 >= stay {
                    *row = (small, sizes[small] + row.1 - stay);
                }
            }
        }
    }
}
