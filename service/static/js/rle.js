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
