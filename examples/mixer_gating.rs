//! MixER-style gating (Nzoyem et al. 2025): environments from several families, each expert
//! best on one family; one [`MixerGate::update`] (mean-L1 K-means on the contexts, per-cluster
//! median losses, greedy cluster→expert matching, least-squares gate) and the routing it gives.
//!
//! Prints the routing accuracy and the gate weights, and writes `mixer_gating.png`: the 2-D
//! contexts coloured by routed expert (a ring marks an environment routed to the wrong expert).
//!
//! ```text
//! cargo run --release --example mixer_gating [-- out.png]
//! ```

use metakernels::moe::MixerGate;
use metakernels::testing::Rng;
use metakernels::{Device, Tensor};

const FAMILIES: usize = 4;
const ENVS_PER_FAMILY: usize = 50;
const CONTEXT_DIM: usize = 2;
const IMAGE: usize = 480;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "mixer_gating.png".into());
    let dev = Device::best();
    let mut rng = Rng::new(2025);

    // Family centres on a circle of radius 3; contexts spread 0.5 around them.
    let e = FAMILIES * ENVS_PER_FAMILY;
    let mut contexts = Vec::with_capacity(e * CONTEXT_DIM);
    let mut losses = Vec::with_capacity(e * FAMILIES);
    let mut family = Vec::with_capacity(e);
    for env in 0..e {
        let f = env % FAMILIES;
        let angle = std::f64::consts::TAU * f as f64 / FAMILIES as f64;
        contexts.push((3.0 * angle.cos() + 0.5 * rng.normal()) as f32);
        contexts.push((3.0 * angle.sin() + 0.5 * rng.normal()) as f32);
        // Expert (f + 2) % FAMILIES is the specialist of family f: low loss there, high elsewhere.
        for j in 0..FAMILIES {
            let specialist = j == (f + 2) % FAMILIES;
            losses
                .push(if specialist { 0.05 + 0.1 * rng.uniform() } else { 0.6 + 0.8 * rng.uniform() } as f32);
        }
        family.push(f);
    }
    let contexts_t = Tensor::from_slice(&contexts, &[e, CONTEXT_DIM], &dev)?;
    let losses_t = Tensor::from_slice(&losses, &[e, FAMILIES], &dev)?;

    let gate = MixerGate { seed: 7, ..MixerGate::default() };
    let update = gate.update(&contexts_t, &losses_t, None)?;
    if let Some(reason) = update.skipped {
        println!("{reason}");
        return Ok(());
    }
    let Some(weights) = update.weights else { return Ok(()) };
    let routed = MixerGate::route(&weights, &contexts_t)?.expert().to_vec::<u32>()?;
    let correct = routed.iter().zip(&family).filter(|(&r, &f)| r as usize == (f + 2) % FAMILIES).count();
    println!("device: {dev}");
    println!("cluster → expert: {:?}", update.cluster_expert);
    println!("routing accuracy: {correct}/{e} = {:.1}%", 100.0 * correct as f64 / e as f64);
    println!("gate weights W [dξ+1 = {}, K = {FAMILIES}] (last row: bias):", CONTEXT_DIM + 1);
    for row in weights.to_vec::<f32>()?.chunks(FAMILIES) {
        println!("  {}", row.iter().map(|v| format!("{v:>9.4}")).collect::<Vec<_>>().join(" "));
    }
    write_png(&out, &contexts, &routed, &family)?;
    println!("wrote {out}");
    Ok(())
}

/// The contexts as dots coloured by routed expert on a white canvas.
fn write_png(
    path: &str,
    contexts: &[f32],
    routed: &[u32],
    family: &[usize],
) -> Result<(), Box<dyn std::error::Error>> {
    const COLOURS: [[u8; 3]; 4] = [[230, 85, 13], [49, 130, 189], [49, 163, 84], [117, 107, 177]];
    let mut img = vec![255u8; IMAGE * IMAGE * 3];
    let (lo, hi) = contexts.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let to_px = |v: f32| (((v - lo) / (hi - lo)) * (IMAGE as f32 - 20.0) + 10.0) as i64;
    for (i, xy) in contexts.chunks(2).enumerate() {
        let (cx, cy) = (to_px(xy[0]), IMAGE as i64 - 1 - to_px(xy[1]));
        let colour = COLOURS[routed[i] as usize % COLOURS.len()];
        let wrong = routed[i] as usize != (family[i] + 2) % FAMILIES;
        for dy in -6i64..=6 {
            for dx in -6i64..=6 {
                let r2 = dx * dx + dy * dy;
                let (px, py) = (cx + dx, cy + dy);
                if px < 0 || py < 0 || px >= IMAGE as i64 || py >= IMAGE as i64 {
                    continue;
                }
                let paint = if r2 <= 16 {
                    Some(colour)
                } else if wrong && r2 <= 36 {
                    Some([0, 0, 0])
                } else {
                    None
                };
                if let Some(c) = paint {
                    let o = (py as usize * IMAGE + px as usize) * 3;
                    img[o..o + 3].copy_from_slice(&c);
                }
            }
        }
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = png::Encoder::new(file, IMAGE as u32, IMAGE as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&img)?;
    Ok(())
}
