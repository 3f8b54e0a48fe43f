#include "rope_index.h"

#include "host_transfer.h"

#include <ATen/ATen.h>
#include <c10/core/DefaultDtype.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <sstream>
#include <utility>
#include <vector>

namespace ropekit {

using namespace rope_index_detail;

namespace {

at::Tensor defined_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : at::Tensor();
}

void check_grid(const at::Tensor& grid, const char* name, const at::Tensor& input_ids) {
  if (!grid.defined()) return;
  TORCH_CHECK_VALUE(grid.dim() == 2 && grid.size(1) == 3, name, ": expected shape (num_grids, 3) of (t, h, w), got ",
                    grid.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(grid.scalar_type(), /*includeBool=*/false), name,
                    ": expected an integer dtype, got ", grid.scalar_type());
  TORCH_CHECK_VALUE(grid.device() == input_ids.device(), name, ": expected device ", input_ids.device(),
                    " (that of input_ids), got ", grid.device());
}

void check_per_token(const at::Tensor& t, const char* name, const at::Tensor& input_ids, bool allow_float) {
  if (!t.defined()) return;
  TORCH_CHECK_VALUE(t.sizes() == input_ids.sizes(), name, ": expected the shape of input_ids ", input_ids.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(allow_float || at::isIntegralType(t.scalar_type(), /*includeBool=*/true), name,
                    ": expected an integer dtype, got ", t.scalar_type());
  TORCH_CHECK_VALUE(!at::isComplexType(t.scalar_type()), name, ": expected a real dtype, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == input_ids.device(), name, ": expected device ", input_ids.device(),
                    " (that of input_ids), got ", t.device());
}

bool four_fifty_seven(const RopeIndexArgs& a) { return !a.token_types(); }

void check_omni(RopeIndexArgs& a, const OmniOptions& o, std::string_view convention, bool strict) {
  const at::Tensor& ids = a.input_ids;
  TORCH_CHECK_VALUE(a.tokens_per_second.has_value() && a.tokens_per_second->isIntegral(/*includeBool=*/false),
                    "tokens_per_second: convention '", convention, "' takes the config's position_id_per_seconds "
                    "here, an int, got ", a.tokens_per_second.has_value() ? "another type" : "none");
  TORCH_CHECK_VALUE(!a.mm_token_type_ids.defined(), "mm_token_type_ids: convention '", convention, "' scans token "
                    "ids (as transformers' Omni get_rope_index does) and takes none");
  TORCH_CHECK_VALUE(!strict, "strict: not available for convention '", convention, "'");
  TORCH_CHECK_VALUE(o.audio_token_id >= 0 && o.audio_start_token_id >= 0, "audio_token_id / audio_start_token_id: "
                    "required by convention '", convention, "', got ", o.audio_token_id, " / ",
                    o.audio_start_token_id);
  a.audio_seqlens = defined_or_empty(o.audio_seqlens);
  if (a.audio_seqlens.defined()) {
    TORCH_CHECK_VALUE(a.audio_seqlens.dim() == 1, "audio_seqlens: expected a 1-D (num_audios,) tensor, got shape ",
                      a.audio_seqlens.sizes());
    TORCH_CHECK_VALUE(at::isIntegralType(a.audio_seqlens.scalar_type(), /*includeBool=*/false),
                      "audio_seqlens: expected an integer dtype, got ", a.audio_seqlens.scalar_type());
    TORCH_CHECK_VALUE(a.audio_seqlens.device() == ids.device(), "audio_seqlens: expected device ", ids.device(),
                      " (that of input_ids), got ", a.audio_seqlens.device());
  }
  constexpr int64_t kMaxChunk = int64_t(1) << 20;  // keeps chunk * tokens_per_chunk inside int64
  TORCH_CHECK_VALUE(a.convention != kOmni25 || (o.tokens_per_chunk >= -kMaxChunk && o.tokens_per_chunk <= kMaxChunk),
                    "tokens_per_chunk: expected |int(position_id_per_seconds * seconds_per_chunk)| <= 2^20, got ",
                    o.tokens_per_chunk);
  TORCH_CHECK_VALUE(a.convention != kOmni3 || o.audio_n_window >= 1, "audio_n_window: convention 'qwen3_omni' "
                    "needs the audio config's n_window (>= 1), got ", o.audio_n_window);
  TORCH_CHECK_VALUE(a.convention != kOmni3 || a.attention_mask.defined() || a.cu_seqlens.defined(),
                    "attention_mask: required by convention 'qwen3_omni' (transformers' Qwen3-Omni indexes it "
                    "unconditionally)");
  const c10::Scalar pps = *a.tokens_per_second;
  TORCH_CHECK_VALUE(std::abs(pps.toLong()) <= (int64_t(1) << 20), "tokens_per_second (position_id_per_seconds): "
                    "expected |value| <= 2^20, got ", pps.toLong());
  a.audio_token_id = o.audio_token_id;
  a.audio_start_token_id = o.audio_start_token_id;
  a.use_audio_in_video = o.use_audio_in_video;
  a.tokens_per_chunk = o.tokens_per_chunk;
  a.audio_n_window = o.audio_n_window;
}

}  // namespace

namespace rope_index_detail {

at::Tensor attended(const RopeIndexArgs& a) {
  const auto B = a.input_ids.size(0), S = a.input_ids.size(1);
  if (a.cu_seqlens.defined()) {
    const auto L = a.input_ids.options().dtype(at::kLong);
    const at::Tensor flat = at::arange(B * S, L).view({B, S});
    const at::Tensor cu = a.cu_seqlens.to(at::kLong);
    return (flat >= cu.select(0, 0)) & (flat < cu.select(0, cu.size(0) - 1));
  }
  if (!a.attention_mask.defined()) return at::ones({B, S}, a.input_ids.options().dtype(at::kBool));
  if (a.packed || a.token_types()) return a.attention_mask != 0;
  return a.attention_mask == 1;
}

std::tuple<at::Tensor, at::Tensor> text_only_branch(const RopeIndexArgs& a) {
  const int64_t B = a.input_ids.size(0), S = a.input_ids.size(1);
  if (a.omni()) {  // the Omni thinkers without grids: the mask's cumulative sum (long, or float for Qwen3-Omni)
    TORCH_CHECK_VALUE(a.attention_mask.defined(), "attention_mask: required without image or video grids (the Omni "
                      "get_rope_index then numbers tokens by the mask; transformers fails without one)");
    const at::Tensor& mask = a.attention_mask;
    at::Tensor p = mask.to(a.float_positions() ? at::kFloat : at::kLong).cumsum(-1) - 1;
    p.masked_fill_(mask == 0, 1);
    at::Tensor pos = p.unsqueeze(0).expand({3, B, S}).contiguous();
    at::Tensor deltas = std::get<0>(p.max(-1, /*keepdim=*/true)) + 1 - at::sum(mask, -1, /*keepdim=*/true);
    return {pos, deltas};
  }
  if (!a.attention_mask.defined()) {
    at::Tensor pos = at::arange(S, a.input_ids.options().dtype(at::kLong)).view({1, 1, S}).expand({3, B, S});
    return {pos.contiguous(), at::zeros({B, 1}, a.input_ids.options())};
  }
  at::Tensor p = a.attention_mask.to(at::kLong).cumsum(-1) - 1;
  p.masked_fill_(a.attention_mask == 0, 1);
  at::Tensor pos = p.unsqueeze(0).expand({3, B, S}).contiguous();
  at::Tensor deltas = std::get<0>(p.max(-1, /*keepdim=*/true)) + 1 - S;
  return {pos, deltas};
}

// The omni conventions' per-video time scale: second_per_grids[v].float(), as a float64's bits.
at::Tensor omni_time_bits(const RopeIndexArgs& a) {
  if (!a.second_per_grid_ts.defined()) return at::empty({0}, a.input_ids.options().dtype(at::kLong));
  return a.second_per_grid_ts.to(at::kFloat).to(at::kDouble).view(at::kLong);
}

bool text_only_branch_applies(const RopeIndexArgs& a) {
  return four_fifty_seven(a) && !a.is_packed() && !a.image_grid_thw.defined() && !a.video_grid_thw.defined();
}

int32_t time_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kTimeF64;
    case at::kFloat: return kTimeF32;
    case at::kBFloat16: return kTimeBF16;
    case at::kHalf: return kTimeF16;
    default:
      TORCH_CHECK_VALUE(at::isIntegralType(t, /*includeBool=*/false), "second_per_grid_ts / tokens_per_second: "
                        "expected a real dtype for the time interval, got ", t);
      return kTimeInt;
  }
}

TimeTensors time_tensors(const RopeIndexArgs& a, int64_t n_videos) {
  TimeTensors out;
  const auto L = a.input_ids.options().dtype(at::kLong);
  const c10::Scalar tps = *a.tokens_per_second;
  const at::ScalarType scalar_dtype =
      tps.isIntegral(/*includeBool=*/false) ? at::kLong : c10::typeMetaToScalarType(c10::get_default_dtype());
  if (a.token_types() && a.second_per_grid_ts.defined()) {
    out.interval = at::mul(a.second_per_grid_ts, tps);  // `tokens_per_second * next(second_per_grid_ts)`
    out.pre = at::ones({out.interval.size(0)}, L);
  } else {
    // tokens_per_second alone: a Python number times an int64 arange (int64, or the default float dtype); 4.57
    // first multiplies by int(second_per_grid_ts[v])
    const bool truncated = !a.token_types() && a.second_per_grid_ts.defined();
    const int64_t n = truncated ? a.second_per_grid_ts.size(0) : n_videos;
    out.interval = at::full({n}, tps, L.dtype(scalar_dtype));
    out.pre = truncated ? a.second_per_grid_ts.to(at::kLong) : at::ones({n}, L);
  }
  out.dtype = out.interval.scalar_type();
  out.code = time_code(out.dtype);
  // the interval's exact value as int64: the bits of a float64 (every float dtype widens exactly), or the integer
  out.interval_bits = out.code == kTimeInt ? out.interval.to(at::kLong) : out.interval.to(at::kDouble).view(at::kLong);
  return out;
}

}  // namespace rope_index_detail

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Host algorithm

const char* kind_name(int64_t kind) { return kind == 1 ? "image" : "video"; }
const char* grid_name(int64_t kind) { return kind == 1 ? "image_grid_thw" : "video_grid_thw"; }

class HostIndexer {
 public:
  HostIndexer(const RopeIndexArgs& a, const int64_t* att, const int64_t* tok, const int64_t* cu, int64_t n_cu,
              GridLists grids, Rules rules)
      : a_(a), att_(att), tok_(tok), cu_(cu), n_cu_(n_cu), r_(rules), g_(grids) {}

  // Fills pos (num_axes, B, S) and deltas (B) as int64.
  void run(int64_t* pos, int64_t* deltas) {
    const int64_t B = a_.input_ids.size(0), S = a_.input_ids.size(1);
    std::fill(pos, pos + a_.num_axes * B * S, a_.token_types() || a_.float_positions() ? 0 : 1);
    std::vector<std::pair<int64_t, int64_t>> segments;  // [begin, end) columns of the row's packed samples
    for (int64_t b = 0; b < B; ++b) {
      if (!a_.is_packed()) {
        sample_.clear();
        for (int64_t s = 0; s < S; ++s)
          if (att_[b * S + s]) sample_.push_back(s);
        const int64_t top = walk(b, pos);
        deltas[b] = a_.omni() ? omni_delta_
                              : top + 1 - (a_.token_types() ? static_cast<int64_t>(sample_.size()) : S);
        continue;
      }
      row_segments(b, segments);
      TORCH_CHECK_VALUE(!segments.empty(), a_.cu_seqlens.defined() ? "cu_seqlens" : "attention_mask", ": row ", b,
                        " holds no packed sample (every row needs one)");
      for (const auto& [begin, end] : segments) {
        sample_.clear();
        for (int64_t s = begin; s < end; ++s) sample_.push_back(s);
        const int64_t top = walk(b, pos);
        deltas[b] = a_.omni() ? omni_delta_ : top + 1 - (end - begin);  // the row's delta: its last sample's
      }
    }
    if (r_.strict) check_all_grids_used();
    if (r_.convention == kXdRope && r_.image_grids) {
      TORCH_CHECK_VALUE(cursor_.image == g_.n_images, "image_grid_thw: ", g_.n_images, " grids but the input has "
                        "only ", cursor_.image, " image spans (transformers fails on this input too)");
    }
  }

 private:
  // Packed row b: maximal runs of equal non-zero segment ids, or the cu_seqlens samples inside the row.
  void row_segments(int64_t b, std::vector<std::pair<int64_t, int64_t>>& out) const {
    const int64_t S = a_.input_ids.size(1);
    out.clear();
    if (a_.cu_seqlens.defined()) {
      for (int64_t k = 0; k + 1 < n_cu_; ++k) {
        const int64_t begin = cu_[k], end = cu_[k + 1];
        if (end <= b * S || begin >= (b + 1) * S || begin == end) continue;
        TORCH_CHECK_VALUE(begin >= b * S && end <= (b + 1) * S, "cu_seqlens: sample ", k, " spans tokens [", begin,
                          ", ", end, ") across rows of length ", S, "; a packed sample must lie inside one row");
        out.emplace_back(begin - b * S, end - b * S);
      }
      return;
    }
    for (int64_t s = 0; s < S;) {
      const int64_t id = att_[b * S + s];
      int64_t e = s + 1;
      while (e < S && att_[b * S + e] == id) ++e;
      if (id != 0) out.emplace_back(s, e);
      s = e;
    }
  }

  // Walks the sample sample_ (columns of row b), writes its positions and returns its largest position. The
  // num_axes - 3 leading rows (xdrope) hold each token's sample index; the last three the parts' positions.
  int64_t walk(int64_t b, int64_t* pos) {
    const int64_t B = a_.input_ids.size(0), S = a_.input_ids.size(1), L = sample_.size();
    ErrorInfo e;
    if (L == 0) raise(fail_info(kEmptySample), b);
    int64_t n_parts = 0, total = 0;
    bool ok;
    // Room for the parts, grown only: each one constructed costs a store per field, so not 2L + 1 of them per row
    // where a run walk needs one a run.
    const auto room = [&](int64_t n) {
      if (static_cast<int64_t>(parts_.size()) < n) parts_.resize(n);
    };
    if (r_.convention == kVisionStart) {
      room(2 * L + 1);
      ok = walk_scan(b, n_parts, total, e);
    } else if (a_.omni()) {
      // parts are constructed (a store per field), so not one per token up front: start from what the spans
      // usually take and grow where the walk runs out (a clip chunked finely, many frames), walking again
      const Cursor start = cursor_;
      int64_t want = std::min<int64_t>(L + 1, 64);
      while (true) {
        room(want);
        ok = walk_omni_sample(b, static_cast<int64_t>(parts_.size()), n_parts, total, e);
        if (ok || e.code != kNoRoom) break;
        cursor_ = start;
        want = std::min<int64_t>(L + 1, 4 * static_cast<int64_t>(parts_.size()));
        e = ErrorInfo{};
      }
    } else {
      sample_runs(b);
      room(static_cast<int64_t>(run_kind_.size()));
      const auto walk_fn = r_.convention == kXdRope ? walk_xd : walk_runs;
      ok = walk_fn(r_, g_, cursor_, run_start_.data(), run_len_.data(), run_kind_.data(),
                   static_cast<int64_t>(run_kind_.size()), parts_.data(), n_parts, total, e);
    }
    int64_t top = 0;
    if (ok && !a_.omni()) ok = finish_sample(r_, g_, parts_.data(), n_parts, total, L, top, e);
    if (!ok) raise(e, b);
    const int64_t lead_axes = a_.num_axes - 3;
    for (int64_t axis = 0; axis < lead_axes; ++axis) {
      for (int64_t i = 0; i < L; ++i) pos[axis * B * S + b * S + sample_[i]] = i;
    }
    if (lead_axes > 0 && L - 1 > top) top = L - 1;
    int64_t* pt = pos + lead_axes * B * S + b * S;
    int64_t* ph = pt + B * S;
    int64_t* pw = ph + B * S;
    if (total == 1) {  // one position for every token (index_put's broadcast): the non-empty part's first
      int64_t k = 0;
      while (k + 1 < n_parts && parts_[k + 1].start <= 0) ++k;
      for (int64_t i = 0; i < L; ++i) {
        const int64_t s = sample_[i];
        any_position(r_, g_, parts_[k], 0, pt[s], ph[s], pw[s]);
      }
      return top;
    }
    // part by part (the parts tile the sample): text runs are plain counts, grids take part_position
    for (int64_t k = 0; k < n_parts; ++k) {
      const Part& part = parts_[k];
      const int64_t* cols = sample_.data() + part.start;
      if (part.kind == 5) {
        write_omni_grid(part, cols, pt, ph, pw);
      } else if (part.kind == 4) {
        for (int64_t o = 0; o < part.len; ++o) omni_position(r_, g_, part, o, pt[cols[o]], ph[cols[o]], pw[cols[o]]);
      } else if (part.kind == 0) {
        for (int64_t o = 0; o < part.len; ++o) pt[cols[o]] = ph[cols[o]] = pw[cols[o]] = part.cur + o;
      } else {
        for (int64_t o = 0; o < part.len; ++o) part_position(r_, g_, part, o, pt[cols[o]], ph[cols[o]], pw[cols[o]]);
      }
    }
    return top;
  }

  // Runs of equal kind among the sample's tokens: 5.x mm_token_type_ids; 4.57 GLM-4V: image tokens between
  // video_start and video_end are video, other image tokens image, the rest text.
  void sample_runs(int64_t b) {
    const int64_t S = a_.input_ids.size(1), L = sample_.size();
    run_start_.clear();
    run_len_.clear();
    run_kind_.clear();
    bool in_video = false;
    int64_t prev = std::numeric_limits<int64_t>::min();
    for (int64_t i = 0; i < L; ++i) {
      const int64_t v = tok_[b * S + sample_[i]];
      int64_t kind = v;
      if (r_.convention == kVideoBrackets) {
        if (v == a_.video_start_token_id) {
          in_video = true;
        } else if (v == a_.video_end_token_id) {
          in_video = false;
        }
        kind = v == a_.image_token_id ? (in_video ? 2 : 1) : 0;
      }
      if (i > 0 && kind == prev) {
        ++run_len_.back();
        continue;
      }
      run_start_.push_back(i);
      run_len_.push_back(1);
      run_kind_.push_back(kind);
      prev = kind;
    }
  }

  // An omni grid part's positions frame by frame, row by row: omni_position without its divisions per token.
  __attribute__((noinline)) void write_omni_grid(const Part& p, const int64_t* cols, int64_t* pt, int64_t* ph,
                                                 int64_t* pw) const {
    const bool flt = r_.convention == kOmni3;
    const float base = omni_float(omni_base(p));
    const int64_t plane = p.hg * p.wg;
    int64_t o = 0, f = p.off / plane, hh = (p.off % plane) / p.wg, ww = p.off % p.wg;
    while (o < p.len) {
      const int64_t t = flt ? float_bits(add_rn(omni_time_float(r_, g_, p, f), base))
                            : p.cur + omni_time_int(r_, g_, p, f);
      for (; hh < p.hg && o < p.len; ++hh, ww = 0) {
        const int64_t h = flt ? float_bits(add_rn(static_cast<float>(hh), base)) : p.cur + hh;
        for (; ww < p.wg && o < p.len; ++ww, ++o) {
          const int64_t c = cols[o];
          pt[c] = t;
          ph[c] = h;
          pw[c] = flt ? float_bits(add_rn(static_cast<float>(ww), base)) : p.cur + ww;
        }
      }
      ++f;
      hh = 0;
    }
  }

  // The Omni thinkers: transformers' token scan (counts, list.index lookups), then walk_omni.
  // (not inlined into walk: the other conventions' per-token loops keep their registers)
  __attribute__((noinline)) bool walk_omni_sample(int64_t b, int64_t room, int64_t& n_parts, int64_t& total,
                                                  ErrorInfo& e) {
    const int64_t S = a_.input_ids.size(1), L = sample_.size();
    const bool q3 = r_.convention == kOmni3;
    tokens_.resize(L);
    for (int64_t i = 0; i < L; ++i) tokens_[i] = tok_[b * S + sample_[i]];
    const int64_t a_id = q3 ? a_.vision_start_token_id : a_.image_token_id;
    const int64_t c_id = q3 ? a_.audio_start_token_id : a_.audio_token_id;
    next_img_.assign(L + 1, L);
    next_vid_.assign(L + 1, L);
    run_len_at_.assign(L + 1, L);
    for (int64_t i = L - 1; i >= 0; --i) {
      const int64_t v = tokens_[i];
      next_img_[i] = v == a_id ? i : next_img_[i + 1];
      next_vid_[i] = v == a_.video_token_id ? i : next_vid_[i + 1];
      run_len_at_[i] = v == c_id ? i : run_len_at_[i + 1];
    }
    OmniScan sc;
    sc.tokens = tokens_.data();
    sc.next_a = next_img_.data();
    sc.next_b = next_vid_.data();
    sc.next_c = run_len_at_.data();
    sc.image_id = a_.image_token_id;
    sc.video_id = a_.video_token_id;
    const int64_t follow = a_.use_audio_in_video ? a_.audio_start_token_id : a_.video_token_id;
    for (int64_t i = 0; i < L; ++i) {
      const int64_t v = tokens_[i];
      sc.has_img |= v == a_.image_token_id;
      sc.has_vid |= v == a_.video_token_id;
      sc.has_aud |= v == a_.audio_token_id;
      sc.n_aud += v == a_.audio_start_token_id;
      if (v == a_.vision_start_token_id) {
        if (i + 1 >= L) return fail(e, kVisionStartAtEnd, i);
        sc.n_img += tokens_[i + 1] == a_.image_token_id;
        sc.n_vid += tokens_[i + 1] == follow;
      }
    }
    return walk_omni(r_, g_, cursor_, sc, L, parts_.data(), room, n_parts, total, omni_delta_, e);
  }

  // 4.57 Qwen-VL: vision_start pairs, then the list.index scan.
  bool walk_scan(int64_t b, int64_t& n_parts, int64_t& total, ErrorInfo& e) {
    const int64_t S = a_.input_ids.size(1), L = sample_.size();
    next_img_.assign(L + 1, L);
    next_vid_.assign(L + 1, L);
    run_len_at_.assign(L + 1, 0);
    int64_t n_img = 0, n_vid = 0, vision_runs = 0;
    for (int64_t i = L - 1; i >= 0; --i) {
      const int64_t v = tok_[b * S + sample_[i]];
      next_img_[i] = v == a_.image_token_id ? i : next_img_[i + 1];
      next_vid_[i] = v == a_.video_token_id ? i : next_vid_[i + 1];
    }
    for (int64_t i = 0; i < L; ++i) {
      const int64_t v = tok_[b * S + sample_[i]];
      if (v == a_.vision_start_token_id) {
        if (i + 1 >= L) return fail(e, kVisionStartAtEnd, i);
        const int64_t next = tok_[b * S + sample_[i + 1]];
        n_img += next == a_.image_token_id;
        n_vid += next == a_.video_token_id;
      }
      if (r_.strict) {  // vision runs (for the strict comparison with the scan's blocks)
        const auto kind_of = [&](int64_t t) {
          return t == a_.video_token_id ? 2 : t == a_.image_token_id ? 1 : 0;
        };
        const int64_t kind = kind_of(v);
        if (kind != 0 && (i == 0 || kind_of(tok_[b * S + sample_[i - 1]]) != kind)) {
          int64_t j = i + 1;
          while (j < L && kind_of(tok_[b * S + sample_[j]]) == kind) ++j;
          run_len_at_[i] = j - i;
          ++vision_runs;
        }
      }
    }
    return walk_vision_start(r_, g_, cursor_, L, next_img_.data(), next_vid_.data(), run_len_at_.data(),
                             vision_runs, n_img, n_vid, parts_.data(), n_parts, total, e);
  }

  static ErrorInfo fail_info(int32_t code) {
    ErrorInfo e;
    e.code = code;
    return e;
  }

  [[noreturn]] void raise(const ErrorInfo& e, int64_t b) const {
    const int64_t L = sample_.size();
    const int64_t s = e.token >= 0 && e.token < L ? sample_[e.token] : -1;
    std::ostringstream where;
    where << "row " << b;
    if (s >= 0) where << ", token " << s;
    const std::string at = where.str();
    const char* also = " (transformers fails on this input too)";
    const char* strict = " (strict=True)";
    switch (e.code) {
      case kEmptySample:
        TORCH_CHECK_VALUE(false, a_.is_packed() ? "packed sample" : "attention_mask", ": ", at,
                          " attends to no token", also);
      case kBadTokenType:
        TORCH_CHECK_VALUE(false, "mm_token_type_ids: expected 0 (text), 1 (image) or 2 (video), got ", e.a, " at ",
                          at, also);
      case kNoImageGrid:
        TORCH_CHECK_VALUE(false, "image_grid_thw: the input has more image spans than the ", e.a,
                          " grids given (", at, ")", also);
      case kNoVideoGrid:
        TORCH_CHECK_VALUE(false, "video_grid_thw: the input has more video spans than the ", e.a,
                          a_.video_frames ? " video frames" : " video grids", " given (", at, ")", also);
      case kNegativeGrid:
        TORCH_CHECK_VALUE(false, grid_name(e.a), ": grid ", e.grid, " has a negative t, h // m or w // m (", at, ")",
                          also);
      case kGridTooLarge:
        TORCH_CHECK_VALUE(false, grid_name(e.a), ": grid ", e.grid, " has more than 2^40 tokens (t * (h // m) * "
                          "(w // m", r_.convention == kFrameBlocks ? " + 1" : "", ")) or an extent above 2^40, which "
                          "no position arithmetic can take; transformers cannot allocate such positions either (", at,
                          ")");
      case kEmptyBeforeMore:
        TORCH_CHECK_VALUE(false, "a vision grid with no tokens (t * (h // m) * (w // m) == 0) is followed by more "
                          "tokens at ", at, "; transformers 4.57 fails taking the max of its empty positions");
      case kLengthMismatch:
        TORCH_CHECK_VALUE(false, "vision span lengths do not match their grids at row ", b, ": the grids give ", e.a,
                          " positions for ", e.b, " tokens (a span's length must be t * (h // m) * (w // m",
                          r_.convention == kFrameBlocks ? " + 1" : "", "))", also);
      case kEmptyGrid:
        TORCH_CHECK_VALUE(false, grid_name(e.a), ": grid ", e.grid, " has no tokens (t * (h // m) * (w // m + 1) == "
                          "0) at ", at, "; transformers fails taking the max of its empty positions");
      case kVisionStartAtEnd:
        TORCH_CHECK_VALUE(false, "input_ids: vision_start_token_id is the last attended token of ", at,
                          " (transformers 4.57 fails indexing past it)");
      case kNotFound:
        if (a_.omni()) {
          const bool q3 = r_.convention == kOmni3;
          const char* what = e.a == 3 ? (q3 ? "audio_start" : "audio") : e.a == 2 ? "video" : q3 ? "vision_start" : "image";
          TORCH_CHECK_VALUE(false, "input_ids: no ", what, " token at or after ", at, " though the token counts "
                            "announce one more span (transformers' list.index fails)");
        }
        TORCH_CHECK_VALUE(false, "input_ids: no ", kind_name(e.a), " token at or after ", at, " though a ",
                          "vision_start pair announces one (transformers 4.57's list.index fails)");
      case kNegativeLength:
        TORCH_CHECK_VALUE(false, "a negative length (", e.a, ") for the text or audio before ", at, ": torch.arange "
                          "fails in transformers too");
      case kNoAudio:
        TORCH_CHECK_VALUE(false, "audio_seqlens: the input has more audio spans than the ", e.a, " lengths given (",
                          at, ")", also);
      case kEmptyPiece:
        TORCH_CHECK_VALUE(false, "an audio or vision span with no positions (length 0) is followed by more tokens at ",
                          at, "; transformers fails taking the max of its empty positions");
      case kTimeRange:
        TORCH_CHECK_VALUE(false, "second_per_grids: video ", e.grid, " has temporal positions (t * second_per_grids "
                          "* position_id_per_seconds, float32) that are NaN or outside [-2^63, 2^63), which "
                          "transformers' .long() does not convert to a defined value (", at, ")");
      case kNoSecondPerGrid:
        TORCH_CHECK_VALUE(false, "second_per_grid_ts: no entry for video ", e.grid, " (", e.a, " given; ", at, ")",
                          also);
      case kStrictSpanLength:
        TORCH_CHECK_VALUE(false, "vision span at ", at, " has ", e.a, " tokens but its grid (image grid or video "
                          "entry ", e.grid, ") with spatial_merge_size ", a_.merge, " needs t * (h / m) * (w / m",
                          r_.convention == kFrameBlocks ? " + 1" : "", ") = ", e.b, strict);
      case kStrictNotDivisible:
        TORCH_CHECK_VALUE(false, grid_name(e.a), ": grid ", e.grid, " must have t >= 1 and h, w positive multiples "
                          "of spatial_merge_size ", a_.merge, strict);
      case kStrictSpansVsStarts:
        TORCH_CHECK_VALUE(false, "input_ids: ", at, " has ", e.a, " vision spans after vision_start_token_id but ",
                          e.b, " image / video token runs", strict);
      case kXdSpanLength:
        TORCH_CHECK_VALUE(false, "image span at ", at, " has ", e.a, " tokens but image grid ", e.grid, " gives ",
                          e.b, " ((h // m) * (w // m + 1)) or ", e.b + 2, " with its first and last tokens", also);
      default:
        TORCH_CHECK_VALUE(false, "rope_index: no result at ", at, " (error ", e.code, ")");
    }
  }

  void check_all_grids_used() const {
    TORCH_CHECK_VALUE(cursor_.image == g_.n_images, "image_grid_thw: ", g_.n_images, " grids but the input has only ",
                      cursor_.image, " image spans (strict=True)");
    TORCH_CHECK_VALUE(cursor_.video == g_.n_entries(), "video_grid_thw: ", g_.n_entries(),
                      a_.video_frames ? " video frames" : " videos", " but the input has only ", cursor_.video,
                      a_.video_frames ? " video frame spans" : " video spans", " (strict=True)");
  }

  const RopeIndexArgs& a_;
  const int64_t *att_, *tok_, *cu_;
  int64_t n_cu_;
  Rules r_;
  GridLists g_;
  Cursor cursor_{};
  std::vector<int64_t> sample_;  // the current sample's columns
  std::vector<Part> parts_;
  std::vector<int64_t> run_start_, run_len_, run_kind_, next_img_, next_vid_, run_len_at_, tokens_;
  int64_t omni_delta_ = 0;  // the omni walk's delta for the sample just walked (int64, or a float32's bits)
};

}  // namespace

namespace rope_index_detail {

Rules rules_of(const RopeIndexArgs& a) {
  Rules r;
  r.convention = a.convention;
  r.merge = a.merge;
  r.strict = a.strict;
  r.scale_time = a.tokens_per_second.has_value();
  r.image_grids = a.image_grid_thw.defined();
  r.sample_ordinals = a.is_packed();
  if (a.omni()) {
    // second_per_grids[v] scales video v's time; videos past its entries (or without it) fail as in transformers
    r.pps = a.tokens_per_second->toLong();
    r.tokens_per_chunk = a.tokens_per_chunk;
    r.n_window = a.audio_n_window;
    r.audio_in_video = a.use_audio_in_video;
    r.second_per_grid_count = a.second_per_grid_ts.defined() ? a.second_per_grid_ts.size(0) : 0;
    return r;
  }
  if (r.scale_time) {
    if (a.second_per_grid_ts.defined()) {
      r.second_per_grid_count = a.second_per_grid_ts.size(0);
    } else if (a.token_types()) {
      r.second_per_grid_count = a.input_ids.size(1);  // 5.x: iter([1] * input_ids.shape[1])
    }
  }
  return r;
}

at::Tensor video_frames_end(const RopeIndexArgs& a, const at::Tensor& videos) {
  const at::Tensor t = videos.select(1, 0);
  if (!a.video_frames) return at::arange(1, videos.size(0) + 1, t.options());
  if (a.convention == kVideoBrackets) return t.clamp_min(1).cumsum(0);
  return t.clamp_min(0).cumsum(0);
}

}  // namespace rope_index_detail

RopeIndexArgs check_rope_index(const at::Tensor& input_ids, const std::optional<at::Tensor>& image_grid_thw,
                               const std::optional<at::Tensor>& video_grid_thw,
                               const std::optional<at::Tensor>& attention_mask,
                               const std::optional<at::Tensor>& mm_token_type_ids, int64_t spatial_merge_size,
                               int64_t image_token_id, int64_t video_token_id, int64_t vision_start_token_id,
                               std::string_view convention, bool video_frames,
                               const std::optional<at::Tensor>& second_per_grid_ts,
                               const std::optional<c10::Scalar>& tokens_per_second, int64_t video_start_token_id,
                               int64_t video_end_token_id, bool packed, const std::optional<at::Tensor>& cu_seqlens,
                               bool strict, int64_t temporal_merge_size, int64_t num_axes,
                               const OmniOptions& omni) {
  RopeIndexArgs a;
  if (convention == "token_types") {
    a.convention = kTokenTypes;
  } else if (convention == "xdrope") {
    a.convention = kXdRope;
  } else if (convention == "frame_blocks") {
    a.convention = kFrameBlocks;
  } else if (convention == "qwen2_5_omni") {
    a.convention = kOmni25;
  } else if (convention == "qwen3_omni") {
    a.convention = kOmni3;
  } else if (convention == "vision_start") {
    a.convention = kVisionStart;
  } else if (convention == "video_brackets") {
    a.convention = kVideoBrackets;
  } else {
    TORCH_CHECK_VALUE(false, "convention: expected 'token_types' (transformers 5.x), 'xdrope' (transformers 5.x "
                      "HunYuan-VL), 'frame_blocks' (transformers 5.x HY-V4-VL), 'vision_start' (transformers 4.57 "
                      "Qwen2-VL / Qwen2.5-VL / Qwen3-VL), 'video_brackets' (transformers 4.57 GLM-4V), "
                      "'qwen2_5_omni' or 'qwen3_omni' (the Omni thinkers), got '", convention, "'");
  }
  TORCH_CHECK_VALUE(a.convention == kXdRope ? num_axes >= 3 : num_axes == 3, "num_axes: expected ",
                    a.convention == kXdRope ? ">= 3 (HunYuan-VL: len(mrope_section))" : "3 (only 'xdrope' has more)",
                    ", got ", num_axes);
  a.num_axes = num_axes;
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "input_ids: expected a 2-D (batch, seq) tensor, got shape ",
                    input_ids.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false),
                    "input_ids: expected an integer dtype, got ", input_ids.scalar_type());
  TORCH_CHECK_VALUE(spatial_merge_size >= 1, "spatial_merge_size: expected >= 1, got ", spatial_merge_size);
  a.input_ids = input_ids;
  a.image_grid_thw = defined_or_empty(image_grid_thw);
  a.video_grid_thw = defined_or_empty(video_grid_thw);
  a.attention_mask = defined_or_empty(attention_mask);
  a.mm_token_type_ids = defined_or_empty(mm_token_type_ids);
  a.second_per_grid_ts = defined_or_empty(second_per_grid_ts);
  a.cu_seqlens = defined_or_empty(cu_seqlens);
  a.tokens_per_second = tokens_per_second;
  check_grid(a.image_grid_thw, "image_grid_thw", input_ids);
  check_grid(a.video_grid_thw, "video_grid_thw", input_ids);
  TORCH_CHECK_VALUE(temporal_merge_size >= 1, "temporal_merge_size: expected >= 1, got ", temporal_merge_size);
  if (temporal_merge_size != 1 && a.video_grid_thw.defined()) {
    // A resampler merging temporal_merge_size frames (ERNIE-4.5-VL): every algorithm walks (t // merge, h, w), as
    // transformers' grid_thw[0].item() // temp_merge_size (floor). One tensor op on the grid's device: no sync.
    at::Tensor merged = a.video_grid_thw.to(at::kLong, /*non_blocking=*/false, /*copy=*/true);
    merged.select(1, 0).div_(temporal_merge_size, "floor");
    a.video_grid_thw = merged;
  }
  check_per_token(a.attention_mask, "attention_mask", input_ids, /*allow_float=*/!packed);
  check_per_token(a.mm_token_type_ids, "mm_token_type_ids", input_ids, /*allow_float=*/false);
  TORCH_CHECK_VALUE(!a.mm_token_type_ids.defined() || a.mm_token_type_ids.scalar_type() != at::kBool,
                    "mm_token_type_ids: expected an integer dtype, got Bool");
  TORCH_CHECK_VALUE(!a.token_types() || a.mm_token_type_ids.defined(),
                    "mm_token_type_ids: required by convention '", convention, "' (transformers 5.x)");
  TORCH_CHECK_VALUE((a.convention != kXdRope && a.convention != kFrameBlocks) ||
                        (!tokens_per_second.has_value() && !second_per_grid_ts.has_value()),
                    "tokens_per_second / second_per_grid_ts: temporal scaling is Qwen2.5-VL's; convention '",
                    convention, "' has none");
  TORCH_CHECK_VALUE(a.convention != kXdRope || !a.video_grid_thw.defined(),
                    "video_grid_thw: convention 'xdrope' (HunYuan-VL) takes images only");
  TORCH_CHECK_VALUE(a.convention != kVideoBrackets || (video_start_token_id >= 0 && video_end_token_id >= 0),
                    "video_start_token_id / video_end_token_id: required by convention 'video_brackets' "
                    "(transformers 4.57 GLM-4V), got ", video_start_token_id, " / ", video_end_token_id);
  if (a.second_per_grid_ts.defined()) {
    TORCH_CHECK_VALUE(tokens_per_second.has_value(), "second_per_grid_ts: given without tokens_per_second (the "
                      "vision config's tokens_per_second scales it)");
    TORCH_CHECK_VALUE(a.second_per_grid_ts.dim() == 1, "second_per_grid_ts: expected a 1-D (num_videos,) tensor, got "
                      "shape ", a.second_per_grid_ts.sizes());
    TORCH_CHECK_VALUE(a.second_per_grid_ts.scalar_type() != at::kBool &&
                          !at::isComplexType(a.second_per_grid_ts.scalar_type()),
                      "second_per_grid_ts: expected a real dtype, got ", a.second_per_grid_ts.scalar_type());
    TORCH_CHECK_VALUE(a.second_per_grid_ts.device() == input_ids.device(), "second_per_grid_ts: expected device ",
                      input_ids.device(), " (that of input_ids), got ", a.second_per_grid_ts.device());
  }
  if (tokens_per_second.has_value()) {
    TORCH_CHECK_VALUE(!tokens_per_second->isComplex() && !tokens_per_second->isBoolean(),
                      "tokens_per_second: expected an int or a float, got ", tokens_per_second->type());
    TORCH_CHECK_VALUE(a.convention != kVideoBrackets, "tokens_per_second: temporal scaling is Qwen2.5-VL's; "
                      "convention 'video_brackets' (GLM-4V) has none");
  }
  if (packed) {
    TORCH_CHECK_VALUE(a.attention_mask.defined(), "attention_mask: packed=True reads segment ids (1, 2, ...; 0 for "
                      "padding) from attention_mask, but none was given");
  }
  if (a.cu_seqlens.defined()) {
    TORCH_CHECK_VALUE(!packed && !a.attention_mask.defined(), "cu_seqlens: give either cu_seqlens or a packed "
                      "attention_mask, not both");
    TORCH_CHECK_VALUE(a.cu_seqlens.dim() == 1 && a.cu_seqlens.size(0) >= 1, "cu_seqlens: expected a 1-D tensor of "
                      "cumulative sample lengths [0, n1, n1 + n2, ...], got shape ", a.cu_seqlens.sizes());
    TORCH_CHECK_VALUE(at::isIntegralType(a.cu_seqlens.scalar_type(), /*includeBool=*/false),
                      "cu_seqlens: expected an integer dtype, got ", a.cu_seqlens.scalar_type());
    TORCH_CHECK_VALUE(a.cu_seqlens.device() == input_ids.device(), "cu_seqlens: expected device ", input_ids.device(),
                      " (that of input_ids), got ", a.cu_seqlens.device());
  }
  if (a.omni()) {
    check_omni(a, omni, convention, strict);
  } else {
    TORCH_CHECK_VALUE(!(omni.audio_seqlens.has_value() && omni.audio_seqlens->defined()) &&
                          omni.audio_token_id == -1 && omni.audio_start_token_id == -1 &&
                          !omni.use_audio_in_video && omni.tokens_per_chunk == 0 && omni.audio_n_window == 0,
                      "audio_seqlens / audio_token_id / audio_start_token_id / use_audio_in_video / tokens_per_chunk "
                      "/ audio_n_window: only the omni conventions take them, not '", convention, "'");
  }
  a.merge = spatial_merge_size;
  a.image_token_id = image_token_id;
  a.video_token_id = video_token_id;
  a.vision_start_token_id = vision_start_token_id;
  a.video_start_token_id = video_start_token_id;
  a.video_end_token_id = video_end_token_id;
  // Omni and HY-V4-VL videos are whole grids, whatever video_frames says
  a.video_frames = a.omni() || a.convention == kFrameBlocks ? false : video_frames;
  a.packed = packed;
  // Qwen2.5-Omni index_puts its int64 positions into a tensor of input_ids' dtype where a mask selects the tokens,
  // which torch refuses for any other dtype (without a mask, a slice assignment casts)
  const bool index_put_fails = a.convention == kOmni25 && input_ids.scalar_type() != at::kLong &&
                               a.attention_mask.defined() && !a.is_packed() &&
                               (a.image_grid_thw.defined() || a.video_grid_thw.defined());
  TORCH_CHECK_VALUE(!index_put_fails, "input_ids: convention 'qwen2_5_omni' with an attention_mask needs int64 "
                    "input_ids, got ", input_ids.scalar_type(), " (transformers' index_put of its int64 positions "
                    "fails on this input too)");
  a.strict = strict;
  return a;
}

std::tuple<at::Tensor, at::Tensor> rope_index_host(const RopeIndexArgs& a) {
  if (text_only_branch_applies(a)) return text_only_branch(a);
  const int64_t B = a.input_ids.size(0), S = a.input_ids.size(1);
  const auto device = a.input_ids.device();
  const auto long_opts = a.input_ids.options().dtype(at::kLong);
  const at::Tensor none = at::empty({0}, long_opts);
  const at::Tensor images = a.image_grid_thw.defined() ? a.image_grid_thw.to(at::kLong) : none.view({0, 3});
  const at::Tensor videos = a.video_grid_thw.defined() ? a.video_grid_thw.to(at::kLong) : none.view({0, 3});
  const int64_t n_videos = videos.size(0);
  // Per token: attended flag (or segment id), then mm_token_type_ids (5.x) or the token ids (4.57).
  const at::Tensor att = a.packed ? a.attention_mask.to(at::kLong) : attended(a).to(at::kLong);
  const at::Tensor tok = a.token_types() ? a.mm_token_type_ids : a.input_ids;
  TimeTensors time;
  at::Tensor time_pre = none, time_interval = none;
  if (a.tokens_per_second.has_value() && !a.omni()) {
    time = time_tensors(a, n_videos);
    time_pre = time.pre;
    time_interval = time.interval_bits;
  }
  const at::Tensor cu = a.cu_seqlens.defined() ? a.cu_seqlens.to(at::kLong) : none;
  if (a.omni()) time_interval = omni_time_bits(a);
  const at::Tensor audio = a.audio_seqlens.defined() ? a.audio_seqlens.to(at::kLong) : none;
  const HostInputs host({att.reshape(-1), tok.reshape(-1), images.reshape(-1), videos.reshape(-1), time_pre,
                         time_interval, cu, video_frames_end(a, videos), audio});

  if (a.video_frames && a.convention != kVideoBrackets) {
    for (int64_t v = 0; v < n_videos; ++v) {
      TORCH_CHECK_VALUE(host[3][3 * v] >= 0, "video_grid_thw: video ", v, " has t = ", host[3][3 * v], " frames "
                        "(transformers' repeat_interleave fails on a negative count)");
    }
  }
  if (a.cu_seqlens.defined()) {
    const int64_t* c = host[6];
    const int64_t n = host.size(6);
    TORCH_CHECK_VALUE(c[0] == 0, "cu_seqlens: expected to start at 0, got ", c[0]);
    for (int64_t k = 0; k + 1 < n; ++k) {
      TORCH_CHECK_VALUE(c[k + 1] >= c[k], "cu_seqlens: expected non-decreasing values, got ", c[k], " then ",
                        c[k + 1]);
    }
    TORCH_CHECK_VALUE(c[n - 1] <= B * S, "cu_seqlens: ends at ", c[n - 1], ", past the ", B * S, " tokens");
  }
  const Rules rules = rules_of(a);
  at::Tensor pos = at::empty({a.num_axes, B, S}, at::TensorOptions().dtype(at::kLong));
  at::Tensor deltas = at::empty({B, 1}, at::TensorOptions().dtype(at::kLong));
  GridLists grids;
  grids.images = host[2];
  grids.n_images = images.size(0);
  grids.videos = host[3];
  grids.frames_end = host[7];
  grids.n_videos = n_videos;
  grids.frames = a.video_frames;
  grids.time_pre = host[4];
  grids.time_interval = host[5];
  grids.time_code = time.code;
  grids.audio_lens = host[8];
  grids.n_audios = host.size(8);
  HostIndexer indexer(a, host[0], host[1], host[6], host.size(6), grids, rules);
  indexer.run(pos.data_ptr<int64_t>(), deltas.data_ptr<int64_t>());
  if (a.strict && a.second_per_grid_ts.defined()) {
    TORCH_CHECK_VALUE(a.second_per_grid_ts.size(0) == n_videos, "second_per_grid_ts: ", a.second_per_grid_ts.size(0),
                      " entries for ", n_videos, " videos (strict=True)");
  }
  if (B == 0 && !a.is_packed()) deltas = deltas.to(at::kFloat);  // torch.tensor([]) of no per-row deltas
  if (a.convention == kXdRope && deltas.scalar_type() == at::kLong) deltas = deltas.to(a.input_ids.scalar_type());
  if (a.float_positions()) {  // Qwen3-Omni: the buffers hold float32 bits
    pos = pos.to(at::kInt).view(at::kFloat);
    if (deltas.scalar_type() == at::kLong) deltas = deltas.to(at::kInt).view(at::kFloat);
    return {push_to_device(pos, device), push_to_device(deltas, device)};
  }
  return {push_to_device(pos.to(a.input_ids.scalar_type()), device), push_to_device(deltas, device)};
}

// ---------------------------------------------------------------------------------------------------------------
// Device algorithm (ATen tensor ops, no host sync): the reference for the fused kernel.

namespace {

// Exclusive and per-group sums along dim 1 of (B, R) tensors, where `first[b, r]` is the index of the first element
// of r's group (groups are contiguous).
at::Tensor exclusive_cumsum(const at::Tensor& x) { return x.cumsum(1) - x; }

at::Tensor grouped_exclusive_cumsum(const at::Tensor& x, const at::Tensor& first) {
  const at::Tensor ex = exclusive_cumsum(x);
  return ex - ex.gather(1, first);
}

// tpos of frame index t (tensor) under per-element scale (pre, interval of the time dtype), as torch computes
// (arange(T) * time_interval).long(): the product in the interval's dtype, then truncation.
at::Tensor time_positions(const at::Tensor& t, const at::Tensor& pre, const at::Tensor& interval) {
  const at::Tensor x = t * pre;
  if (at::isIntegralType(interval.scalar_type(), /*includeBool=*/false)) return x * interval;
  return (x.to(interval.scalar_type()) * interval).to(at::kLong);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_index_reference(const RopeIndexArgs& a) {
  TORCH_CHECK_VALUE(a.convention != kXdRope && a.convention != kFrameBlocks && !a.omni(), "rope_index: the ATen "
                    "reference does not implement convention '", a.convention == kXdRope ? "xdrope" :
                    a.convention == kFrameBlocks ? "frame_blocks" : a.convention == kOmni3 ? "qwen3_omni" :
                    "qwen2_5_omni", "'; on_host=True, or a CPU or CUDA tensor (the fused algorithm), computes it");
  if (text_only_branch_applies(a)) return text_only_branch(a);
  const int64_t B = a.input_ids.size(0), S = a.input_ids.size(1), m = a.merge;
  const auto L = a.input_ids.options().dtype(at::kLong);
  const bool v5 = a.token_types();
  if (B == 0 || S == 0) {
    if (B > 0) at::_assert_async(at::zeros({}, L.dtype(at::kBool)), "ropekit.rope_index: rows of no token");
    return {at::empty({3, B, S}, a.input_ids.options()), at::empty({B, 1}, L.dtype(a.is_packed() ? at::kLong : at::kFloat))};
  }
  std::vector<at::Tensor> ok;  // every condition for a result, checked by one asynchronous assert at the end

  // ---- samples: a row's attended tokens, or each packed segment
  const at::Tensor att = attended(a);
  const at::Tensor col = at::arange(S, L).expand({B, S});
  at::Tensor sample_start;
  if (a.cu_seqlens.defined()) {
    const at::Tensor cu = a.cu_seqlens.to(at::kLong);
    const at::Tensor flat = col + at::arange(B, L).unsqueeze(1) * S;
    sample_start = att & at::isin(flat, cu);  // a segment begins where a cumulative length points
    // a segment must not cross a row: no segment may run into column 0 of the next row
    const at::Tensor cross = att & (col == 0) & at::logical_not(at::isin(flat, cu));
    ok.push_back(cross.any().logical_not());
    ok.push_back((cu.narrow(0, 1, cu.size(0) - 1) >= cu.narrow(0, 0, cu.size(0) - 1)).all() &
                 (cu.select(0, 0) == 0) & (cu.select(0, cu.size(0) - 1) <= B * S));
  } else if (a.packed) {
    const at::Tensor seg = a.attention_mask.to(at::kLong);
    const at::Tensor prev = at::cat({at::zeros({B, 1}, L), seg.narrow(1, 0, S - 1)}, 1);
    sample_start = att & (seg != prev);
  } else {
    sample_start = att & (att.cumsum(1) == 1);
  }
  const at::Tensor rank = att.cumsum(1) - 1;                  // index among the row's attended tokens
  const at::Tensor sample = sample_start.cumsum(1) - 1;        // the row's sample of each token
  const at::Tensor samples = sample_start.sum(1, /*keepdim=*/true);
  ok.push_back((samples > 0).all());                           // every row holds a sample (with a token)
  const at::Tensor sample_slot = at::where(sample_start, sample, S);
  const at::Tensor sample_first_rank =
      at::zeros({B, S + 1}, L).scatter_(1, sample_slot, rank).narrow(1, 0, S);  // per sample
  const at::Tensor sample_len =
      at::zeros({B, S + 1}, L).scatter_add_(1, at::where(att, sample.clamp_min(0), S), att.to(at::kLong))
          .narrow(1, 0, S);
  const at::Tensor tok_sample = sample.clamp(0, S - 1);
  const at::Tensor local = rank - sample_first_rank.gather(1, tok_sample);  // index inside its sample

  // ---- token kinds: 0 text, 1 image, 2 video (other values: 5.x fails on them)
  at::Tensor kind;
  if (v5) {
    kind = a.mm_token_type_ids.to(at::kLong);
  } else if (a.convention == kVideoBrackets) {
    // inside [video_start, video_end] of the same sample (start wins on a tie, as it is tested first)
    const at::Tensor first_col = std::get<0>(at::where(sample_start, col, -1).cummax(1));
    const at::Tensor last_start = std::get<0>(at::where(att & (a.input_ids == a.video_start_token_id), col, -1).cummax(1));
    const at::Tensor last_end = std::get<0>(at::where(att & (a.input_ids == a.video_end_token_id), col, -1).cummax(1));
    const at::Tensor in_video = (last_start >= first_col) & (last_start >= last_end);
    const at::Tensor zero = at::zeros({}, L);
    kind = at::where(a.input_ids == a.image_token_id, at::where(in_video, 2, 1), zero);
  } else {
    const at::Tensor zero = at::zeros({}, L);
    kind = at::where(a.input_ids == a.video_token_id, 2, at::where(a.input_ids == a.image_token_id, 1, zero));
  }

  // ---- runs of equal kind inside a sample
  const at::Tensor last_att = std::get<0>(at::where(att, col, -1).cummax(1));
  const at::Tensor prev_att = at::cat({at::full({B, 1}, -1, L), last_att.narrow(1, 0, S - 1)}, 1);
  const at::Tensor prev_kind = at::where(prev_att >= 0, kind.gather(1, prev_att.clamp_min(0)), -1);
  const at::Tensor run_start = att & (sample_start | (kind != prev_kind));
  const at::Tensor run = run_start.cumsum(1) - 1;
  const at::Tensor runs = run_start.sum(1, /*keepdim=*/true);
  const at::Tensor run_valid = col < runs;
  const at::Tensor slot = at::where(run_start, run, S);
  auto per_run = [&](const at::Tensor& v) { return at::zeros({B, S + 1}, L).scatter_(1, slot, v).narrow(1, 0, S); };
  const at::Tensor run_kind = per_run(kind);
  const at::Tensor run_col = per_run(col);
  const at::Tensor run_sample = per_run(sample);
  const at::Tensor run_first_of_sample = per_run(sample_start.to(at::kLong)).to(at::kBool) & run_valid;
  const at::Tensor run_len =
      at::zeros({B, S + 1}, L).scatter_add_(1, at::where(att, run, S), att.to(at::kLong)).narrow(1, 0, S);
  // each run's first run of its sample
  const at::Tensor sample_first_run =
      at::zeros({B, S + 1}, L).scatter_(1, at::where(run_first_of_sample, run_sample, S), col).narrow(1, 0, S);
  const at::Tensor group_first = sample_first_run.gather(1, run_sample.clamp(0, S - 1));
  const at::Tensor last_run_of_sample = at::cat({run_first_of_sample.narrow(1, 1, S - 1),
                                                 at::ones({B, 1}, L.dtype(at::kBool))}, 1) | (col + 1 == runs);

  // ---- grids, in run order across the batch
  const at::Tensor is_text = run_valid & (run_kind == 0);
  const at::Tensor is_image = run_valid & (run_kind == 1);
  const at::Tensor is_video = run_valid & (run_kind == 2);
  if (v5) ok.push_back((run_valid.logical_not() | is_text | is_image | is_video).all());
  const at::Tensor image_rank = is_image.reshape(-1).cumsum(0).reshape({B, S}) - 1;
  const at::Tensor entry_rank = is_video.reshape(-1).cumsum(0).reshape({B, S}) - 1;
  const at::Tensor dummy = at::full({1, 3}, m, L);  // keeps clamped lookups in range; filled on the device
  dummy.select(1, 0).fill_(1);
  const at::Tensor images = a.image_grid_thw.defined() ? a.image_grid_thw.to(at::kLong) : at::empty({0, 3}, L);
  const at::Tensor videos = a.video_grid_thw.defined() ? a.video_grid_thw.to(at::kLong) : at::empty({0, 3}, L);
  const int64_t n_images = images.size(0), n_videos = videos.size(0);
  const at::Tensor image_grid =
      at::cat({images, dummy}).index_select(0, image_rank.clamp(0, n_images).reshape(-1)).view({B, S, 3});
  ok.push_back((is_image.logical_not() | (image_rank < n_images)).all());
  const at::Tensor video_t = videos.select(1, 0);
  if (a.video_frames && a.convention != kVideoBrackets) ok.push_back((video_t >= 0).all());  // repeat_interleave
  const at::Tensor frames_end = video_frames_end(a, videos);
  const at::Tensor n_entries = n_videos > 0 ? frames_end.select(0, n_videos - 1) : at::zeros({}, L);
  const at::Tensor video_of_entry =
      at::searchsorted(frames_end, entry_rank.clamp_min(0), /*out_int32=*/false, /*right=*/true).clamp_max(n_videos);
  const at::Tensor entry_t =
      a.video_frames ? at::ones({B, S}, L)
                     : at::cat({video_t, at::ones({1}, L)}).index_select(0, video_of_entry.reshape(-1)).view({B, S});
  ok.push_back((is_video.logical_not() | (entry_rank < n_entries)).all());
  const at::Tensor video_grid = at::cat({videos, dummy}).index_select(0, video_of_entry.reshape(-1)).view({B, S, 3});
  const at::Tensor gt = at::where(is_image, image_grid.select(2, 0), at::where(is_video, entry_t, 0));
  const at::Tensor gh = at::where(is_image, image_grid.select(2, 1), at::where(is_video, video_grid.select(2, 1), 0));
  const at::Tensor gw = at::where(is_image, image_grid.select(2, 2), at::where(is_video, video_grid.select(2, 2), 0));
  const at::Tensor hg = gh.div(m, "floor"), wg = gw.div(m, "floor");
  const at::Tensor vision = is_image | is_video;
  ok.push_back((vision.logical_not() | ((gt >= 0) & (hg >= 0) & (wg >= 0))).all());
  {  // take_grid's kMaxGridTokens rule: every extent <= max, and (when none is 0) h // m <= max / t and
     // w // m <= max / (t * (h // m)), so the product is tested without overflow
    const at::Tensor max = at::scalar_tensor(kMaxGridTokens, L);
    const at::Tensor t_c = gt.clamp(1, kMaxGridTokens);
    const at::Tensor h_max = max.div(t_c, "trunc");
    const at::Tensor th = (t_c * at::minimum(hg, h_max)).clamp_min(1);
    const at::Tensor extents = (gt <= kMaxGridTokens) & (hg <= kMaxGridTokens) & (wg <= kMaxGridTokens);
    const at::Tensor product = (gt == 0) | (hg == 0) | (wg == 0) | ((hg <= h_max) & (wg <= max.div(th, "trunc")));
    ok.push_back((vision.logical_not() | (extents & product)).all());
  }
  const at::Tensor grid_len = gt * hg * wg;
  const at::Tensor part_len = at::where(vision, grid_len, at::where(is_text, run_len, 0));

  // ---- temporal positions (Qwen2.5-VL scaling) and each part's extent
  at::Tensor pre = at::ones({B, S}, L), interval = at::ones({B, S}, L);
  if (a.tokens_per_second.has_value()) {
    const TimeTensors time = time_tensors(a, n_videos);
    const int64_t count = time.interval.size(0);
    const at::Tensor v = video_of_entry.clamp(0, std::max<int64_t>(count - 1, 0));
    const at::Tensor one = at::ones({1}, time.interval.options());
    const at::Tensor video_interval = at::cat({time.interval, one}).index_select(0, v.reshape(-1)).view({B, S});
    const at::Tensor video_pre = at::cat({time.pre, at::ones({1}, L)}).index_select(0, v.reshape(-1)).view({B, S});
    // images: 5.x time_interval = 1; 4.57 multiplies by 0
    pre = at::where(is_video, video_pre, v5 ? 1 : 0);
    interval = at::where(is_video, video_interval, at::ones({}, time.interval.options()));
    const int64_t limit = a.second_per_grid_ts.defined() ? count : (v5 ? S : -1);
    if (limit >= 0) ok.push_back((is_video.logical_not() | (video_of_entry < limit)).all());
  }
  const at::Tensor t_last = time_positions((gt - 1).clamp_min(0), pre, interval);
  const at::Tensor t_first = time_positions(at::zeros_like(gt), pre, interval);
  const at::Tensor extent = at::where(
      vision, at::maximum(at::maximum(t_first, t_last), at::maximum(hg - 1, wg - 1)), part_len - 1);
  at::Tensor advance;
  if (v5) {
    advance = at::where(vision, at::maximum(gh, gw).div(m, "floor"), part_len);
  } else {
    advance = at::where(part_len > 0, extent + 1, 0);
    ok.push_back((vision.logical_not() | (part_len > 0) | last_run_of_sample).all());  // empty grid, then more
  }
  const at::Tensor cur = grouped_exclusive_cumsum(advance, group_first);

  // ---- each sample's parts must fill its tokens (or be a single position, which broadcasts)
  const at::Tensor part_total_ex = exclusive_cumsum(part_len);
  const at::Tensor sample_part_offset = part_total_ex.gather(1, group_first);  // per run: its sample's first part
  const at::Tensor run_sample_total =
      at::zeros({B, S + 1}, L).scatter_add_(1, at::where(run_valid, run_sample, S), part_len).narrow(1, 0, S);
  const at::Tensor sample_valid = col < samples;
  ok.push_back((sample_valid.logical_not() | (run_sample_total == sample_len) | (run_sample_total == 1)).all());

  // 4.57 Qwen-VL: the scan's blocks are the vision runs when each matches its grid (the reference's domain)
  if (a.convention == kVisionStart) {
    ok.push_back((vision.logical_not() | (run_len == grid_len)).all());
    const at::Tensor first_after = std::get<0>(at::where(att, col, S).flip(1).cummin(1)).flip(1);
    const at::Tensor next_att = at::cat({first_after.narrow(1, 1, S - 1), at::full({B, 1}, S, L)}, 1);
    const at::Tensor same_sample =
        (next_att < S) & (sample.gather(1, next_att.clamp_max(S - 1)) == sample);
    const at::Tensor starts = att & (a.input_ids == a.vision_start_token_id);
    ok.push_back((starts.logical_not() | same_sample).all());  // vision_start is never a sample's last token
    const at::Tensor next_kind = at::where(same_sample, kind.gather(1, next_att.clamp_max(S - 1)), 0);
    auto per_sample = [&](const at::Tensor& flags) {
      return at::zeros({B, S + 1}, L).scatter_add_(1, at::where(att, sample.clamp_min(0), S), flags.to(at::kLong))
          .narrow(1, 0, S);
    };
    auto per_sample_runs = [&](const at::Tensor& flags) {
      return at::zeros({B, S + 1}, L).scatter_add_(1, at::where(run_valid, run_sample, S), flags.to(at::kLong))
          .narrow(1, 0, S);
    };
    ok.push_back((per_sample(starts & (next_kind == 1)) == per_sample_runs(is_image)).all());
    ok.push_back((per_sample(starts & (next_kind == 2)) == per_sample_runs(is_video)).all());
  }
  if (a.strict) {
    ok.push_back((vision.logical_not() | ((run_len == grid_len) & (gt >= 1) & (gh >= m) & (gw >= m) &
                                          (gh.remainder(m) == 0) & (gw.remainder(m) == 0)))
                     .all());
    ok.push_back(is_image.sum() == n_images);
    ok.push_back(is_video.sum() == n_entries);
    if (a.second_per_grid_ts.defined()) ok.push_back(at::full({}, a.second_per_grid_ts.size(0) == n_videos, L.dtype(at::kBool)));
  }

  // ---- each token's part: the last part starting at or before its place in the row's concatenated parts
  const at::Tensor tok_sample_total = run_sample_total.gather(1, tok_sample);
  const at::Tensor tok_offset =
      sample_part_offset.gather(1, run.clamp(0, S - 1)) + at::where(tok_sample_total == 1, 0, local);
  const at::Tensor big = at::full({}, std::numeric_limits<int64_t>::max(), L);
  const at::Tensor part_start = at::where(run_valid, part_total_ex, big);
  const at::Tensor tok_run =
      (at::searchsorted(part_start, tok_offset, /*out_int32=*/false, /*right=*/true) - 1).clamp(0, S - 1);
  const at::Tensor o = tok_offset - part_start.gather(1, tok_run).clamp_max(tok_offset);
  const at::Tensor r_vision = vision.gather(1, tok_run);
  const at::Tensor r_hg = hg.gather(1, tok_run).clamp_min(1), r_wg = wg.gather(1, tok_run).clamp_min(1);
  const at::Tensor r_cur = cur.gather(1, tok_run);
  const at::Tensor plane = r_hg * r_wg;
  const at::Tensor t_pos = time_positions(o.div(plane, "floor"), pre.gather(1, tok_run), interval.gather(1, tok_run));
  const at::Tensor pt = r_cur + at::where(r_vision, t_pos, o);
  const at::Tensor ph = r_cur + at::where(r_vision, o.remainder(plane).div(r_wg, "floor"), o);
  const at::Tensor pw = r_cur + at::where(r_vision, o.remainder(r_wg), o);
  at::Tensor pos = at::stack({pt, ph, pw});
  pos = at::where(att.unsqueeze(0), pos, v5 ? 0 : 1);

  // ---- deltas: the row's largest position + 1 - its length (5.x: attended tokens; 4.57: S); packed rows: their
  // last sample's, against its own length
  const at::Tensor lowest = at::full({}, std::numeric_limits<int64_t>::min(), L);
  at::Tensor in_delta = att;
  if (a.is_packed()) in_delta = att & (sample == samples - 1);
  const at::Tensor top = std::get<0>(at::where(in_delta, std::get<0>(pos.max(0)), lowest).max(1));
  at::Tensor base;
  if (a.is_packed()) {
    base = sample_len.gather(1, (samples - 1).clamp_min(0)).squeeze(1);
  } else {
    base = v5 ? att.sum(1) : at::full({B}, S, L);
  }
  const at::Tensor deltas = (top + 1 - base).unsqueeze(1);
  at::_assert_async(at::stack(ok).all(),
                    "ropekit.rope_index: no result for these inputs (transformers fails on them too, e.g. more vision "
                    "spans than grids or span lengths that do not match their grids), or they lie outside the device "
                    "algorithm's domain; run with on_host=True for a precise error");
  return {pos.to(a.input_ids.scalar_type()), deltas};
}

std::tuple<at::Tensor, at::Tensor> rope_index(
    const at::Tensor& input_ids, const std::optional<at::Tensor>& image_grid_thw,
    const std::optional<at::Tensor>& video_grid_thw, const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& mm_token_type_ids, int64_t spatial_merge_size, int64_t image_token_id,
    int64_t video_token_id, int64_t vision_start_token_id, c10::string_view convention, bool on_host,
    bool video_frames, const std::optional<at::Tensor>& second_per_grid_ts,
    const std::optional<c10::Scalar>& tokens_per_second, int64_t video_start_token_id, int64_t video_end_token_id,
    bool packed, const std::optional<at::Tensor>& cu_seqlens, bool strict, int64_t temporal_merge_size,
    int64_t num_axes, const std::optional<at::Tensor>& audio_seqlens, int64_t audio_token_id,
    int64_t audio_start_token_id, bool use_audio_in_video, int64_t tokens_per_chunk, int64_t audio_n_window) {
  const RopeIndexArgs a = check_rope_index(
      input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids, spatial_merge_size, image_token_id,
      video_token_id, vision_start_token_id, std::string_view(convention.data(), convention.size()), video_frames,
      second_per_grid_ts, tokens_per_second, video_start_token_id, video_end_token_id, packed, cu_seqlens, strict,
      temporal_merge_size, num_axes,
      OmniOptions{audio_seqlens, audio_token_id, audio_start_token_id, use_audio_in_video, tokens_per_chunk,
                  audio_n_window});
  if (on_host) return rope_index_host(a);
  // The device path is the fused algorithm (as a kernel on CUDA, serially on the CPU): its domain is every input the
  // host loop takes. The ATen composition stays the test reference, and serves other devices (its domain excludes
  // 4.57 vision_start spans that do not match their grids).
  return (input_ids.is_cuda() || input_ids.is_cpu()) ? rope_index_kernel(a) : rope_index_reference(a);
}

// ---------------------------------------------------------------------------------------------------------------
// The fused device algorithm (rope_index_kernel.h): inputs prepared with tensor ops on the inputs' device (no sync),
// then the row code, on CUDA as a kernel, on the CPU serially.

namespace {

// One "thread" per row: trivial scans. The row code's strided loops then cover every index in order.
struct SerialExec {
  static constexpr int kThreads = 1;
  int64_t tid() const { return 0; }
  void sync() const {}
  int64_t exclusive_sum(int64_t v, int64_t& aggregate) const {
    aggregate = v;
    return 0;
  }
  int64_t inclusive_max(int64_t v, int64_t& aggregate) const {
    aggregate = v;
    return v;
  }
  int64_t inclusive_min(int64_t v, int64_t& aggregate) const {
    aggregate = v;
    return v;
  }
  int64_t sum(int64_t v) const { return v; }
};

const char* error_name(int32_t code) {
  switch (code) {
    case kEmptySample: return "a row or packed sample without tokens";
    case kBadTokenType: return "an mm_token_type_ids value other than 0, 1, 2";
    case kNoImageGrid: return "more image spans than image grids";
    case kNoVideoGrid: return "more video spans than video grids / frames";
    case kNegativeGrid: return "a negative grid extent";
    case kGridTooLarge: return "a grid of more than 2^40 tokens or an extent above 2^40";
    case kEmptyBeforeMore: return "an empty grid followed by more tokens (4.57)";
    case kLengthMismatch: return "vision span lengths that do not match their grids";
    case kVisionStartAtEnd: return "a trailing vision_start_token_id (4.57)";
    case kNotFound: return "no image / video token after a vision_start pair (4.57)";
    case kNoSecondPerGrid: return "no second_per_grid_ts entry for a video";
    case kStrictSpanLength: return "a span whose length is not t * (h / m) * (w / m) (strict=True)";
    case kStrictNotDivisible: return "a grid with t < 1 or h, w not multiples of the merge size (strict=True)";
    case kStrictSpansVsStarts: return "vision_start pairs that do not match the vision runs (strict=True)";
    case kXdSpanLength: return "an image span whose length is neither (h // m) * (w // m + 1) nor that + 2";
    case kNegativeLength: return "a negative text or audio length (omni)";
    case kNoAudio: return "more audio spans than audio_seqlens entries (omni)";
    case kEmptyPiece: return "an audio or vision span of no positions followed by more tokens (omni)";
    case kEmptyGrid: return "a vision grid of no tokens (frame_blocks)";
    case kTimeRange: return "temporal positions outside int64 (Qwen2.5-Omni)";
    case kOmniCounts: return "spans that differ from what the token scan counts (omni; repaired by a serial pass)";
    default: return "no result";
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rope_index_kernel(const RopeIndexArgs& a) {
  if (text_only_branch_applies(a)) return text_only_branch(a);
  const int64_t B = a.input_ids.size(0), S = a.input_ids.size(1);
  const auto L = a.input_ids.options().dtype(at::kLong);
  if (B == 0 || S == 0) {
    if (B > 0) at::_assert_async(at::zeros({}, L.dtype(at::kBool)), "ropekit.rope_index: rows of no token");
    const auto pos_dtype = a.float_positions() ? at::kFloat : a.input_ids.scalar_type();
    return {at::empty({a.num_axes, B, S}, a.input_ids.options().dtype(pos_dtype)),
            at::empty({B, 1}, L.dtype(a.is_packed() && !a.float_positions() ? at::kLong : at::kFloat))};
  }
  const at::Tensor att = (a.packed ? a.attention_mask : attended(a)).to(at::kLong).contiguous();
  const at::Tensor tok = (a.token_types() ? a.mm_token_type_ids : a.input_ids).to(at::kLong).contiguous();
  const at::Tensor images =
      (a.image_grid_thw.defined() ? a.image_grid_thw.to(at::kLong) : at::empty({0, 3}, L)).contiguous();
  const at::Tensor videos =
      (a.video_grid_thw.defined() ? a.video_grid_thw.to(at::kLong) : at::empty({0, 3}, L)).contiguous();
  const int64_t n_videos = videos.size(0);
  const at::Tensor frames_end = video_frames_end(a, videos).contiguous();
  std::vector<at::Tensor> ok;  // conditions checked by an asynchronous assert (no sync)
  if (a.video_frames && a.convention != kVideoBrackets && n_videos > 0) {
    ok.push_back((videos.select(1, 0) >= 0).all());  // repeat_interleave by t
  }
  at::Tensor cu;
  if (a.cu_seqlens.defined()) {
    cu = a.cu_seqlens.to(at::kLong).contiguous();
    const int64_t n = cu.size(0);
    ok.push_back((cu.select(0, 0) == 0) & (cu.select(0, n - 1) <= B * S) &
                 (cu.narrow(0, 1, n - 1) >= cu.narrow(0, 0, n - 1)).all());
  }
  TimeTensors time;
  if (a.tokens_per_second.has_value() && !a.omni()) time = time_tensors(a, n_videos);
  const at::Tensor omni_time = a.omni() ? omni_time_bits(a).contiguous() : at::Tensor();
  const at::Tensor audio =
      a.audio_seqlens.defined() ? a.audio_seqlens.to(at::kLong).contiguous() : at::empty({0}, L);
  if (a.strict && a.second_per_grid_ts.defined()) {
    TORCH_CHECK_VALUE(a.second_per_grid_ts.size(0) == n_videos, "second_per_grid_ts: ", a.second_per_grid_ts.size(0),
                      " entries for ", n_videos, " videos (strict=True)");
  }

  KernelParams p;
  p.B = B;
  p.S = S;
  p.att = att.data_ptr<int64_t>();
  p.tok = tok.data_ptr<int64_t>();
  p.cu = cu.defined() ? cu.data_ptr<int64_t>() : nullptr;
  p.n_cu = cu.defined() ? cu.size(0) : 0;
  p.packed_mask = a.packed;
  p.rules = rules_of(a);
  p.grids.images = images.data_ptr<int64_t>();
  p.grids.n_images = images.size(0);
  p.grids.videos = videos.data_ptr<int64_t>();
  p.grids.frames_end = frames_end.data_ptr<int64_t>();
  p.grids.n_videos = n_videos;
  p.grids.frames = a.video_frames;
  if (time.pre.defined()) {
    p.grids.time_pre = time.pre.data_ptr<int64_t>();
    p.grids.time_interval = time.interval_bits.data_ptr<int64_t>();
    p.grids.time_code = time.code;
  }
  if (a.omni()) p.grids.time_interval = omni_time.data_ptr<int64_t>();
  p.grids.audio_lens = audio.data_ptr<int64_t>();
  p.grids.n_audios = audio.size(0);
  p.audio_id = a.audio_token_id;
  p.audio_start_id = a.audio_start_token_id;
  p.image_id = a.image_token_id;
  p.video_id = a.video_token_id;
  p.vision_start_id = a.vision_start_token_id;
  p.video_start_id = a.video_start_token_id;
  p.video_end_id = a.video_end_token_id;
  p.pad = a.token_types() || a.float_positions() ? 0 : 1;
  p.axes = a.num_axes;
  p.delta_vs_attended = a.token_types();
  const at::Tensor scratch = at::empty({10, B * (S + 1)}, L);
  int64_t* base = scratch.data_ptr<int64_t>();
  int64_t** slots[] = {&p.cols, &p.vals, &p.kinds, &p.run_start, &p.run_len, &p.run_kind, &p.next_img, &p.next_vid,
                       &p.run_len_at, &p.sample_start};
  for (int i = 0; i < 10; ++i) *slots[i] = base + i * B * (S + 1);
  const at::Tensor parts = at::empty({B * (2 * S + 1) * static_cast<int64_t>(sizeof(Part))}, L.dtype(at::kByte));
  p.parts = reinterpret_cast<Part*>(parts.data_ptr());
  const at::Tensor counts = at::empty({B, 3}, L);
  const at::Tensor error = at::empty({B}, L.dtype(at::kInt));
  at::Tensor pos = at::empty({a.num_axes, B, S}, L);
  at::Tensor deltas = at::empty({B, 1}, L);
  p.counts = counts.data_ptr<int64_t>();
  p.error = error.data_ptr<int32_t>();
  p.pos = pos.data_ptr<int64_t>();
  p.deltas = deltas.data_ptr<int64_t>();

  if (a.input_ids.is_cuda()) {
#ifdef ROPEKIT_WITH_CUDA
    const c10::DeviceGuard guard(a.input_ids.device());
    launch_rope_index_kernel(p);
#else
    TORCH_CHECK(false, "ropekit.rope_index: this build has no CUDA kernels");
#endif
  } else {
    TORCH_CHECK(a.input_ids.is_cpu(), "ropekit.rope_index: the fused algorithm runs on CUDA or (serially) the CPU");
    SerialExec x;
    RowState state;
    const auto row = a.omni() ? &index_row<SerialExec, true> : &index_row<SerialExec, false>;
    for (int64_t b = 0; b < B; ++b) row(x, state, p, b, kPassCount);
    for (int64_t b = 0; b < B; ++b) row(x, state, p, b, kPassIndex);
    if (a.omni()) {
      bool needed;
      repair_rows(x, state, p, needed);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int32_t code = error.data_ptr<int32_t>()[b];
      TORCH_CHECK_VALUE(code == kOk, "ropekit.rope_index (fused algorithm): no result for row ", b, ": ",
                        error_name(code));
    }
    if (a.convention == kXdRope && a.image_grid_thw.defined()) {
      const int64_t used = counts.select(1, 0).sum().item<int64_t>();  // the CPU: no device to sync with
      TORCH_CHECK_VALUE(used == images.size(0), "ropekit.rope_index (fused algorithm): ", images.size(0),
                        " image grids but the input has only ", used, " image spans");
    }
  }
  if (a.convention == kXdRope && a.image_grid_thw.defined()) {
    ok.push_back(counts.select(1, 0).sum() == images.size(0));  // HunYuan-VL fails on grids left over
  }
  ok.push_back((error == kOk).all());
  if (a.strict) {
    const at::Tensor used = counts.sum(0);
    const at::Tensor n_entries = n_videos > 0 ? frames_end.select(0, n_videos - 1) : at::zeros({}, L);
    ok.push_back((used.select(0, 0) == images.size(0)) & (used.select(0, 1) == n_entries));
  }
  at::_assert_async(at::stack(ok).all(),
                    "ropekit.rope_index: no result for these inputs (transformers fails on them too, e.g. more vision "
                    "spans than grids or span lengths that do not match their grids), or grids left over with "
                    "strict=True; run with on_host=True for a precise error");
  // HunYuan-VL's deltas are torch.tensor() of its positions' maxima: input_ids' dtype (every other family: int64)
  if (a.convention == kXdRope) deltas = deltas.to(a.input_ids.scalar_type());
  if (a.float_positions()) return {pos.to(at::kInt).view(at::kFloat), deltas.to(at::kInt).view(at::kFloat)};
  return {pos.to(a.input_ids.scalar_type()), deltas};
}

std::tuple<at::Tensor, at::Tensor> rope_index_algorithm_op(
    const at::Tensor& input_ids, const std::optional<at::Tensor>& image_grid_thw,
    const std::optional<at::Tensor>& video_grid_thw, const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& mm_token_type_ids, int64_t spatial_merge_size, int64_t image_token_id,
    int64_t video_token_id, int64_t vision_start_token_id, c10::string_view convention, bool video_frames,
    const std::optional<at::Tensor>& second_per_grid_ts, const std::optional<c10::Scalar>& tokens_per_second,
    int64_t video_start_token_id, int64_t video_end_token_id, bool packed, const std::optional<at::Tensor>& cu_seqlens,
    bool strict, int64_t temporal_merge_size, int64_t num_axes, const std::optional<at::Tensor>& audio_seqlens,
    int64_t audio_token_id, int64_t audio_start_token_id, bool use_audio_in_video, int64_t tokens_per_chunk,
    int64_t audio_n_window, c10::string_view algorithm) {
  const RopeIndexArgs a = check_rope_index(
      input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids, spatial_merge_size, image_token_id,
      video_token_id, vision_start_token_id, std::string_view(convention.data(), convention.size()), video_frames,
      second_per_grid_ts, tokens_per_second, video_start_token_id, video_end_token_id, packed, cu_seqlens, strict,
      temporal_merge_size, num_axes,
      OmniOptions{audio_seqlens, audio_token_id, audio_start_token_id, use_audio_in_video, tokens_per_chunk,
                  audio_n_window});
  const std::string_view which(algorithm.data(), algorithm.size());
  if (which == "host") return rope_index_host(a);
  if (which == "reference") return rope_index_reference(a);
  TORCH_CHECK_VALUE(which == "kernel", "algorithm: expected 'host', 'reference' or 'kernel', got '", which, "'");
  return rope_index_kernel(a);
}

}  // namespace ropekit
