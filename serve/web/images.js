// Turns a picked, pasted or dropped file into the data: URL that is sent. An image within the server's
// limits goes as its own bytes (so answers match the batch job's for the same file); one over the pixel
// cap (a 12-MP phone photo on a 4-MP server) or the byte cap is downscaled here on a canvas first, so it
// is answered instead of refused with a 413. A file the browser cannot decode is sent as it is: the
// server is the judge of what it can read (and says why it cannot).

const RE_ENCODE_TRIES = 6;

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

/** Bytes a base64 data: URL holds. */
export function dataUrlBytes(url) {
  const b64 = url.slice(url.indexOf(",") + 1);
  const padding = b64.endsWith("==") ? 2 : b64.endsWith("=") ? 1 : 0;
  return Math.floor((b64.length * 3) / 4) - padding;
}

/** The largest size of the same aspect ratio with at most `maxPixels` pixels. */
export function fitPixels(width, height, maxPixels) {
  if (!maxPixels || width * height <= maxPixels) return { width, height };
  const scale = Math.sqrt(maxPixels / (width * height));
  let w = Math.max(1, Math.floor(width * scale));
  let h = Math.max(1, Math.floor(height * scale));
  while (w * h > maxPixels) {  // floating point: never one pixel over
    if (w >= h) w -= 1; else h -= 1;
  }
  return { width: w, height: h };
}

function encode(bitmap, width, height, type) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  if (type === "image/jpeg") {  // JPEG has no alpha: what was transparent becomes white, not black
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
  }
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, width, height);
  return canvas.toDataURL(type, 0.9);
}

/**
 * {url, name, width, height, bytes, original: {width, height, bytes}, downscaled, decoded} for `file`
 * under `limits` ({max_image_pixels, max_image_bytes}; null: send as it is).
 */
export async function prepareImage(file, limits) {
  const name = file.name || "pasted image";
  const original = { width: null, height: null, bytes: file.size };
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    const url = await readAsDataUrl(file);
    return { url, name, width: null, height: null, bytes: file.size, original, downscaled: false, decoded: false };
  }
  original.width = bitmap.width;
  original.height = bitmap.height;
  const maxPixels = limits && limits.max_image_pixels;
  const maxBytes = limits && limits.max_image_bytes;
  let { width, height } = fitPixels(bitmap.width, bitmap.height, maxPixels);
  const tooManyPixels = width !== bitmap.width || height !== bitmap.height;
  if (!tooManyPixels && !(maxBytes && file.size > maxBytes)) {
    bitmap.close();
    const url = await readAsDataUrl(file);
    return { url, name, width, height, bytes: file.size, original, downscaled: false, decoded: true };
  }
  let type = file.type === "image/jpeg" ? "image/jpeg" : "image/png";
  let url = encode(bitmap, width, height, type);
  for (let i = 0; maxBytes && dataUrlBytes(url) > maxBytes && i < RE_ENCODE_TRIES; i++) {
    if (type === "image/png") {
      type = "image/jpeg";  // a photo as PNG is large; as JPEG at the same size it usually fits
    } else {
      width = Math.max(1, Math.floor(width * 0.75));
      height = Math.max(1, Math.floor(height * 0.75));
    }
    url = encode(bitmap, width, height, type);
  }
  bitmap.close();
  return { url, name, width, height, bytes: dataUrlBytes(url), original, downscaled: true, decoded: true };
}
