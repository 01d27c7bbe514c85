//! The CUDA-graph-ready decoder step (`Decoder::forward_static` over a
//! `StaticCache` and `StepInputs`) against the growing-cache path
//! (`Decoder::forward_hidden`), on tiny random-weight Gemma-3 (sliding
//! window 4, shorter than the sequences) and Llama configurations, on the
//! CPU in f32.

mod common;

use candle_core::{CpuStorage, Device, Storage, Tensor};
use common::{max_abs, max_diff, random_decoder, tiny_config};
use router::model::{dense_batch, Architecture, Batch, Cache, Decoder, Mode, StaticCache};

const ARCHS: [Architecture; 2] = [Architecture::Gemma3, Architecture::Llama];

/// Rows of every batch after the shared prefix.
const ROWS: usize = 3;

/// Length of the shared prefix (a system prompt).
const PREFIX: usize = 5;

/// Columns the script appends after the prefix (see [`script`]).
const APPENDED: usize = 4 + 3 + 3 + 2 + 1;

fn tiny(arch: Architecture) -> Decoder {
    random_decoder(&tiny_config(arch), 7, &Device::Cpu)
}

/// One step: row-major tokens (0 at padding), their positions, and how
/// many of its columns each row rejects afterwards (drafts).
struct Step {
    tokens: Vec<u32>,
    batch: Batch,
    forget: [usize; ROWS],
}

fn step(index: u32, rows: [Vec<Option<u32>>; ROWS], forget: [usize; ROWS]) -> Step {
    let tokens = rows
        .iter()
        .enumerate()
        .flat_map(|(r, cols)| {
            cols.iter().enumerate().map(move |(c, p)| match p {
                Some(_) => (index * 13 + r as u32 * 7 + c as u32 * 3 + 1) % 97,
                None => 0,
            })
        })
        .collect();
    Step {
        tokens,
        batch: Batch {
            rows: rows.to_vec(),
        },
        forget,
    }
}

/// After the prefix (positions 0..5): a ragged, left-padded prefill; three
/// single-token steps; three drafts per row of which rows 0 and 2 reject
/// 2 and 3 (their positions are written again); two single-token steps
/// (positions reach 15, well past the window of 4); and a step where row 1
/// has finished (a padding column).
fn script() -> Vec<Step> {
    let p = Some;
    vec![
        step(
            0,
            [
                vec![p(5), p(6), p(7), p(8)],
                vec![None, p(5), p(6), p(7)],
                vec![None, None, None, p(5)],
            ],
            [0; ROWS],
        ),
        step(1, [vec![p(9)], vec![p(8)], vec![p(6)]], [0; ROWS]),
        step(2, [vec![p(10)], vec![p(9)], vec![p(7)]], [0; ROWS]),
        step(3, [vec![p(11)], vec![p(10)], vec![p(8)]], [0; ROWS]),
        step(
            4,
            [
                vec![p(12), p(13), p(14)],
                vec![p(11), p(12), p(13)],
                vec![p(9), p(10), p(11)],
            ],
            [2, 0, 3],
        ),
        step(5, [vec![p(13)], vec![p(14)], vec![p(9)]], [0; ROWS]),
        step(6, [vec![p(14)], vec![p(15)], vec![p(10)]], [0; ROWS]),
        step(7, [vec![p(15)], vec![None], vec![p(11)]], [0; ROWS]),
    ]
}

/// The shared prefix, cached by the growing path for one row.
fn prefix(dec: &Decoder) -> Cache {
    common::prefix_cache(dec, PREFIX)
}

/// Hidden states of every step with a growing cache.
fn run_growing(dec: &Decoder) -> Vec<Tensor> {
    let mut cache = prefix(dec).repeat(ROWS).unwrap();
    script()
        .into_iter()
        .map(|s| {
            let t = Tensor::from_vec(s.tokens, (ROWS, s.batch.width()), &Device::Cpu).unwrap();
            let h = dec
                .forward_hidden(&t, &s.batch, Some(&mut cache), Mode::Infer)
                .unwrap();
            for (row, n) in s.forget.into_iter().enumerate() {
                cache.forget_last(row, n);
            }
            h
        })
        .collect()
}

/// Hidden states of every step with `cache` (emptied, then loaded with
/// the prefix); see [`static_steps`].
fn run_static(dec: &Decoder, cache: &mut StaticCache) -> Vec<Tensor> {
    cache.reset();
    cache.load(&prefix(dec).repeat(ROWS).unwrap()).unwrap();
    assert_eq!(cache.len(), PREFIX);
    static_steps(dec, cache, script())
}

/// Runs `steps` on `cache` (static), one set of step inputs per width
/// refilled at every step of that width, as graph replay would.
fn static_steps(dec: &Decoder, cache: &mut StaticCache, steps: Vec<Step>) -> Vec<Tensor> {
    let capacity = cache.capacity();
    let mut inputs = Vec::new();
    steps
        .into_iter()
        .map(|s| {
            let width = s.batch.width();
            let at = match inputs.iter().position(|(w, _)| *w == width) {
                Some(at) => at,
                None => {
                    let fresh = dec.step_inputs(ROWS, width, capacity).unwrap();
                    inputs.push((width, fresh));
                    inputs.len() - 1
                }
            };
            let step_inputs = &mut inputs[at].1;
            step_inputs.fill(&s.tokens, &s.batch, cache).unwrap();
            let h = dec.forward_static(step_inputs, cache).unwrap();
            cache.advance(&s.batch).unwrap();
            for (row, n) in s.forget.into_iter().enumerate() {
                cache.forget_last(row, n);
            }
            h
        })
        .collect()
}

fn assert_same(arch: Architecture, what: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.dims(), w.dims(), "{arch:?} {what} step {i}");
        let d = max_diff(g, w);
        assert!(d < 1e-5, "{arch:?} {what} step {i}: max difference {d}");
    }
}

/// Address of a CPU tensor's storage.
fn address(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
        Storage::Cpu(CpuStorage::U32(v)) => v.as_ptr() as usize,
        _ => panic!("expected f32 or u32 CPU storage"),
    }
}

#[test]
fn static_steps_equal_growing_cache_steps() {
    for arch in ARCHS {
        let dec = tiny(arch);
        let want = run_growing(&dec);
        // Exactly the room the script needs: the last step fills it.
        let mut cache = dec.static_cache(ROWS, PREFIX + APPENDED).unwrap();
        let got = run_static(&dec, &mut cache);
        assert_eq!(cache.len(), cache.capacity());
        assert_same(arch, "static", &got, &want);
    }
}

#[test]
fn larger_capacity_and_reused_cache_give_the_same_result() {
    for arch in ARCHS {
        let dec = tiny(arch);
        let mut tight = dec.static_cache(ROWS, PREFIX + APPENDED).unwrap();
        let want = run_static(&dec, &mut tight);
        let mut roomy = dec.static_cache(ROWS, 3 * (PREFIX + APPENDED)).unwrap();
        assert_same(arch, "capacity", &run_static(&dec, &mut roomy), &want);
        // Reset keeps the previous run's keys and values in the buffers:
        // they must stay masked until written again.
        assert_same(arch, "reused", &run_static(&dec, &mut tight), &want);
    }
}

#[test]
fn fill_and_steps_write_into_the_same_buffers() {
    for arch in ARCHS {
        let dec = tiny(arch);
        let mut cache = dec.static_cache(ROWS, 16).unwrap();
        cache.load(&prefix(&dec).repeat(ROWS).unwrap()).unwrap();
        let mut inputs = dec.step_inputs(ROWS, 1, 16).unwrap();
        assert_eq!(inputs.mask_local().is_some(), arch == Architecture::Gemma3);
        let buffers = |inputs: &router::model::StepInputs, cache: &StaticCache| {
            let mut all = vec![
                inputs.tokens().clone(),
                inputs.positions().clone(),
                inputs.columns().clone(),
                inputs.mask_global().clone(),
            ];
            all.extend(inputs.mask_local().cloned());
            for (k, v) in cache.kv() {
                all.extend([k.clone(), v.clone()]);
            }
            all
        };
        let before = buffers(&inputs, &cache);
        let ids: Vec<_> = before.iter().map(Tensor::id).collect();
        let addresses: Vec<_> = before.iter().map(address).collect();
        let unchanged = |inputs: &router::model::StepInputs, cache: &StaticCache| {
            let now = buffers(inputs, cache);
            assert_eq!(
                now.iter().map(Tensor::id).collect::<Vec<_>>(),
                ids,
                "{arch:?}"
            );
            assert_eq!(
                now.iter().map(address).collect::<Vec<_>>(),
                addresses,
                "{arch:?}"
            );
        };
        // Handles taken before: in-place writes show through them.
        let (tokens, columns) = (inputs.tokens().clone(), inputs.columns().clone());
        let k0 = cache.kv()[0].0.clone();
        let written = |col: usize| max_abs(&k0.narrow(2, col, 1).unwrap()) > 0.0;
        for (n, token) in [11u32, 12].into_iter().enumerate() {
            let len = PREFIX + n;
            let batch = dense_batch(ROWS, len as u32, 1);
            inputs
                .fill(&[token, token + 1, token + 2], &batch, &cache)
                .unwrap();
            unchanged(&inputs, &cache);
            assert_eq!(
                tokens.to_vec2::<u32>().unwrap(),
                [[token], [token + 1], [token + 2]]
            );
            assert_eq!(columns.to_vec1::<u32>().unwrap(), [len as u32]);
            assert!(
                written(len - 1) && !written(len),
                "{arch:?} before step {n}"
            );
            dec.forward_static(&inputs, &cache).unwrap();
            cache.advance(&batch).unwrap();
            unchanged(&inputs, &cache);
            assert!(written(len) && !written(len + 1), "{arch:?} after step {n}");
        }
        cache.reset();
        assert!(cache.is_empty());
        unchanged(&inputs, &cache);
    }
}

#[test]
fn exceeding_the_capacity_is_an_error() {
    for arch in ARCHS {
        let dec = tiny(arch);
        let prefix = prefix(&dec).repeat(ROWS).unwrap();
        let mut small = dec.static_cache(ROWS, PREFIX - 1).unwrap();
        let err = small.load(&prefix).unwrap_err().to_string();
        assert!(err.contains("capacity 4"), "{err}");

        let mut cache = dec.static_cache(ROWS, PREFIX + 2).unwrap();
        cache.load(&prefix).unwrap();
        let mut inputs = dec.step_inputs(ROWS, 3, PREFIX + 2).unwrap();
        let batch = dense_batch(ROWS, PREFIX as u32, 3);
        let err = inputs
            .fill(&[1; 3 * ROWS], &batch, &cache)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("capacity exceeded") && err.contains("5 of 7") && err.contains("needs 8"),
            "{err}"
        );
        let err = cache.advance(&batch).unwrap_err().to_string();
        assert!(err.contains("capacity exceeded"), "{err}");
        assert_eq!(cache.len(), PREFIX);

        // Inputs and caches of other shapes are refused, not misread.
        let err = dec.step_inputs(ROWS, 8, 7).unwrap_err().to_string();
        assert!(err.contains("within the capacity"), "{err}");
        let other = dec.step_inputs(ROWS, 1, 9).unwrap();
        let err = dec.forward_static(&other, &cache).unwrap_err().to_string();
        assert!(err.contains("9 columns"), "{err}");
    }
}

/// What the router does with a static cache besides stepping it: keep the
/// prefix for the next batch (`truncate`, nothing copied), and hand a batch
/// that outgrows the capacity over to a growing cache (`to_cache`).
#[test]
fn a_truncated_or_handed_over_static_cache_goes_on_exactly() {
    for arch in ARCHS {
        let dec = tiny(arch);
        let want = run_growing(&dec);
        let mut cache = dec.static_cache(ROWS, PREFIX + APPENDED + 8).unwrap();
        run_static(&dec, &mut cache);
        // The prefix stays written: the same script again, without reloading.
        cache.truncate(PREFIX);
        assert_eq!(cache.len(), PREFIX);
        assert_same(
            arch,
            "truncated",
            &static_steps(&dec, &mut cache, script()),
            &want,
        );

        // Three steps in the static cache, the rest in a growing copy of it.
        cache.truncate(PREFIX);
        let mut steps = script();
        let rest = steps.split_off(3);
        let mut got = static_steps(&dec, &mut cache, steps);
        let mut growing = cache.to_cache().unwrap();
        assert_eq!(growing.len(), cache.len());
        for s in rest {
            let t = Tensor::from_vec(s.tokens, (ROWS, s.batch.width()), &Device::Cpu).unwrap();
            got.push(
                dec.forward_hidden(&t, &s.batch, Some(&mut growing), Mode::Infer)
                    .unwrap(),
            );
            for (row, n) in s.forget.into_iter().enumerate() {
                growing.forget_last(row, n);
            }
        }
        assert_same(arch, "handed over", &got, &want);
    }
}
