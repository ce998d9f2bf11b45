//! Training loops: a small model (the mean of each bag's rows, fitted to targets) trained by
//! sparse SGD and row-wise Adagrad converges, on owned tables, on f16/bf16 tables, and on a
//! writable file map, which is left holding the trained table.

use embedding_lookup::ops::grad::EmbeddingBagBackward;
use embedding_lookup::ops::optim::{Rounding, RowwiseAdagrad, Sgd};
use embedding_lookup::util::Rng;
use embedding_lookup::{
    BagMode, BagOptions, Bags, CoalescedGrad, DType, OpenMode, OpenOptions, Table,
};

const ROWS: usize = 60;
const DIM: usize = 8;
const BAG: usize = 3;
const SAMPLES: usize = 40;
/// Row 0 is padding: bags may contain it, it counts for nothing and is never trained.
const PADDING: i64 = 0;

struct Data {
    indices: Vec<i64>,
    targets: Vec<f32>,
}

fn data() -> Data {
    let mut rng = Rng::new(99);
    let indices = (0..SAMPLES * BAG)
        .map(|p| {
            // Every bag's first entry is a real row; the others are sometimes padding.
            if p % BAG != 0 && rng.below(5) == 0 {
                PADDING
            } else {
                1 + rng.below(ROWS as u64 - 1) as i64
            }
        })
        .collect();
    let targets = (0..SAMPLES * DIM).map(|_| rng.normal()).collect();
    Data { indices, targets }
}

/// The model: each sample's prediction is the mean of its bag's non-padding rows (the
/// library's bag forward, as `nn.EmbeddingBag(mode="mean", padding_idx=0)`). Returns the loss
/// `½ Σ ‖pred − target‖²` and its gradient with respect to the predictions.
fn forward(table: &Table<'_>, d: &Data) -> (f64, Vec<f32>) {
    let pred: Vec<f32> = table
        .bag(
            &d.indices,
            Bags::fixed(BAG),
            &BagOptions::mode(BagMode::Mean),
        )
        .unwrap();
    let grad: Vec<f32> = pred.iter().zip(&d.targets).map(|(p, t)| p - t).collect();
    let loss = grad.iter().map(|&e| 0.5 * (e as f64) * (e as f64)).sum();
    (loss, grad)
}

fn backward(d: &Data, grad_out: &[f32]) -> CoalescedGrad {
    EmbeddingBagBackward::new(&d.indices, Bags::fixed(BAG), BagMode::Mean)
        .padding_idx(Some(PADDING))
        .coalesced(grad_out, ROWS, DIM)
        .unwrap()
}

enum Opt {
    Sgd(Sgd),
    Adagrad(RowwiseAdagrad),
}

impl Opt {
    fn step(&mut self, table: &mut Table<'_>, g: &CoalescedGrad) {
        match self {
            Opt::Sgd(o) => o.step(table, g).unwrap(),
            Opt::Adagrad(o) => o.step(table, g).unwrap(),
        }
    }
}

/// Train for `steps`; the losses before each step and after the last.
fn train(table: &mut Table<'_>, d: &Data, opt: &mut Opt, steps: usize) -> Vec<f64> {
    let mut losses = Vec::with_capacity(steps + 1);
    for _ in 0..steps {
        let (loss, grad_out) = forward(table, d);
        losses.push(loss);
        let g = backward(d, &grad_out);
        assert!(!g.rows().contains(&(PADDING as usize)));
        opt.step(table, &g);
    }
    losses.push(forward(table, d).0);
    losses
}

fn fresh(dtype: DType) -> Table<'static> {
    Table::new_embedding(ROWS, DIM, dtype, Some(PADDING), 7).unwrap()
}

#[test]
fn sparse_sgd_fits_the_targets() {
    let d = data();
    let mut table = fresh(DType::F32);
    let losses = train(&mut table, &d, &mut Opt::Sgd(Sgd::new(1.0).unwrap()), 3000);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(first > 10.0, "a random table fits badly: {first}");
    assert!(last < 1e-6 * first, "loss {first} -> {last}");
    // The loss falls over every stretch of training, not just overall.
    for w in losses.chunks(300).collect::<Vec<_>>().windows(2) {
        assert!(w[1][0] < w[0][0], "{} then {}", w[0][0], w[1][0]);
    }
    // The padding row was never touched: still the zeros nn.Embedding gave it.
    assert_eq!(
        table.row::<f32>(PADDING as usize).unwrap().unwrap(),
        &[0.0; DIM]
    );
}

#[test]
fn rowwise_adagrad_fits_the_targets() {
    let d = data();
    let mut table = fresh(DType::F32);
    let opt = RowwiseAdagrad::new(ROWS, 0.5, 1e-8).unwrap();
    let losses = train(&mut table, &d, &mut Opt::Adagrad(opt), 3000);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 1e-4 * first, "loss {first} -> {last}");
}

#[test]
fn half_precision_tables_train_to_their_precision() {
    let d = data();
    for dtype in [DType::F16, DType::BF16] {
        let mut finals = Vec::new();
        for rounding in [Rounding::NearestEven, Rounding::Stochastic { seed: 3 }] {
            let mut table = fresh(dtype);
            let opt = Sgd::new(1.0).unwrap().with_rounding(rounding);
            let losses = train(&mut table, &d, &mut Opt::Sgd(opt), 1500);
            let (first, last) = (losses[0], *losses.last().unwrap());
            // bf16 keeps 8 significant bits, f16 11: the fit stops near the weights' precision,
            // and with rounding to nearest earlier, when updates fall below half an ulp.
            let floor = match (dtype, rounding) {
                (DType::F16, Rounding::NearestEven) => 1e-3,
                (DType::F16, _) => 1e-5,
                (_, Rounding::NearestEven) => 1e-2,
                _ => 1e-4,
            };
            assert!(
                last < floor * first,
                "{dtype} {rounding:?}: loss {first} -> {last}"
            );
            finals.push(last);
        }
        // Stochastic rounding keeps the small updates that rounding to nearest loses.
        assert!(finals[1] < 0.1 * finals[0], "{dtype}: {finals:?}");
    }
}

#[test]
fn training_a_writable_file_map_leaves_the_trained_table_in_the_file() {
    let d = data();
    for (dtype, name) in [(DType::F32, "table.safetensors"), (DType::F16, "table.npy")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        // The same start on disk and in memory.
        let mut owned = fresh(dtype);
        owned.save(&path).unwrap();
        let mut mapped = Table::open_with(
            &path,
            &OpenOptions {
                tensor: None,
                mode: OpenMode::MapWritable,
                ..Default::default()
            },
        )
        .unwrap()
        .with_padding_idx(PADDING)
        .unwrap();
        assert!(mapped.is_zero_copy());

        let make = || Opt::Adagrad(RowwiseAdagrad::new(ROWS, 0.5, 1e-8).unwrap());
        let mem_losses = train(&mut owned, &d, &mut make(), 500);
        let map_losses = train(&mut mapped, &d, &mut make(), 500);
        assert_eq!(
            mem_losses, map_losses,
            "{dtype}: the same loop gives the same losses"
        );
        assert!(*map_losses.last().unwrap() < 1e-2 * map_losses[0]);
        mapped.flush().unwrap();
        drop(mapped);

        // Reopened from disk, the file holds the trained table, bit for bit.
        let reopened = Table::open(&path, None)
            .unwrap()
            .with_padding_idx(PADDING)
            .unwrap();
        assert_eq!(reopened.as_bytes(), owned.as_bytes(), "{dtype}");
        assert_eq!(forward(&reopened, &d).0, *mem_losses.last().unwrap());
    }
}
