// Files the page reads and writes: an uploaded JPEG as stored (no EXIF rotation), and a mask
// saved as PNG or as COCO RLE JSON.

import { el } from "./api.js";
import { rleToMask } from "./rle.js";

/** The file with its EXIF orientation tag (if any) set to 1, "as stored". The server segments
 * the stored pixels and ignores EXIF orientation (as the datasets do), while browsers rotate
 * JPEGs by it when decoding, and Chromium no longer lets createImageBitmap opt out. */
export async function withoutExifRotation(file) {
  const view = new DataView(await file.arrayBuffer());
  try {
    if (view.getUint16(0) !== 0xffd8) return file;  // not a JPEG: nothing to undo
    let offset = 2;
    while (offset + 4 <= view.byteLength) {
      const marker = view.getUint16(offset);
      if ((marker & 0xff00) !== 0xff00 || marker === 0xffda) break;  // start of scan: no EXIF
      if (marker === 0xffe1 && view.getUint32(offset + 4) === 0x45786966) {  // APP1 "Exif"
        const tiff = offset + 10;
        const little = view.getUint16(tiff) === 0x4949;
        const ifd = tiff + view.getUint32(tiff + 4, little);
        for (let i = 0; i < view.getUint16(ifd, little); i++) {
          const entry = ifd + 2 + i * 12;
          if (view.getUint16(entry, little) === 0x0112) {  // Orientation
            view.setUint16(entry + 8, 1, little);
            return new Blob([view.buffer], { type: file.type });
          }
        }
        return file;
      }
      offset += 2 + view.getUint16(offset + 2);
    }
  } catch (error) {
    if (!(error instanceof RangeError)) throw error;  // a truncated header: decode as it is
  }
  return file;
}

function save(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** Save the COCO RLE mask ``rle`` as ``<stem>.png`` (white on black) or ``<stem>.rle.json``. */
export function saveMask(rle, stem, format) {
  if (format === "rle") {
    save(new Blob([JSON.stringify({ size: rle.size, counts: rle.counts })],
                  { type: "application/json" }), `${stem}.rle.json`);
    return;
  }
  const mask = rleToMask(rle);
  const [h, w] = rle.size;
  const canvas = el("canvas", { width: w, height: h });
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  for (let i = 0; i < mask.length; i += 1) {
    const v = mask[i] ? 255 : 0;
    image.data.set([v, v, v, 255], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
  canvas.toBlob((blob) => save(blob, `${stem}.png`), "image/png");
}
