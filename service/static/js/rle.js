// COCO compressed RLE (pycocotools' `counts` string) <-> masks, in the browser.
// A mask here is a Uint8Array of height * width in row-major order (1 on the object); COCO
// runs go down the columns (Fortran order), starting with a run of zeros.

export function decodeCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

export function rleToMask(rle) {
  const [height, width] = rle.size;
  const mask = new Uint8Array(height * width);
  let index = 0;
  let value = 0;
  for (const run of decodeCounts(rle.counts)) {
    if (value) {
      for (let i = index; i < index + run; i += 1) {
        const x = Math.floor(i / height);
        const y = i - x * height;
        mask[y * width + x] = 1;
      }
    }
    index += run;
    value = 1 - value;
  }
  return mask;
}

// pycocotools' rleToString: each count (from the third on, as the difference to the count two
// before) in 5-bit groups, least significant first, 0x20 meaning "more follows", + 48.
export function encodeCounts(counts) {
  let text = "";
  counts.forEach((count, i) => {
    let x = i > 2 ? count - counts[i - 2] : count;
    let more = true;
    while (more) {
      let c = x & 0x1f;
      x >>= 5;
      more = (c & 0x10) ? x !== -1 : x !== 0;
      if (more) c |= 0x20;
      text += String.fromCharCode(c + 48);
    }
  });
  return text;
}

// A row-major mask (height * width, nonzero on the object) -> {size, counts} as
// pycocotools.mask.encode gives for the same pixels.
export function maskToRle(mask, height, width) {
  const counts = [];
  let value = 0;
  let run = 0;
  for (let x = 0; x < width; x += 1) {
    for (let y = 0; y < height; y += 1) {
      const v = mask[y * width + x] ? 1 : 0;
      if (v !== value) {
        counts.push(run);
        run = 0;
        value = v;
      }
      run += 1;
    }
  }
  counts.push(run);
  return { size: [height, width], counts: encodeCounts(counts) };
}
