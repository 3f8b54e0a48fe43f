// Moving the small integer inputs of the index ops (rope_index, the vision position ops) to the host and their
// results back: one device-to-host transfer per call (the one sync of a host path), and non-blocking copies back.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <vector>

namespace ropekit {

// Host-side int64 views of the inputs. For accelerator inputs they are packed on the device and brought over in a
// single transfer through pinned memory (one sync in total); CPU inputs are read in place.
class HostInputs {
 public:
  explicit HostInputs(std::vector<at::Tensor> parts) {
    const bool on_cpu = parts.front().device().is_cpu();
    if (on_cpu) {
      for (auto& t : parts) parts_.push_back(t.to(at::kLong).contiguous());
    } else {
      at::Tensor packed = at::cat(parts);
      at::Tensor host = at::empty(packed.sizes(), packed.options().device(at::kCPU).pinned_memory(true));
      host.copy_(packed, /*non_blocking=*/true);
      c10::impl::VirtualGuardImpl impl(packed.device().type());
      impl.getStream(packed.device()).synchronize();
      int64_t offset = 0;
      for (const auto& t : parts) {
        parts_.push_back(host.narrow(0, offset, t.numel()));
        offset += t.numel();
      }
    }
  }
  const int64_t* operator[](size_t i) const { return parts_[i].data_ptr<int64_t>(); }
  int64_t size(size_t i) const { return parts_[i].numel(); }

 private:
  std::vector<at::Tensor> parts_;
};

inline at::Tensor push_to_device(const at::Tensor& host, const at::Device& device) {
  if (device.is_cpu()) return host;
  // Pinned source + non_blocking: no sync; the caching host allocator keeps the buffer until the copy is done.
  at::Tensor pinned = at::empty(host.sizes(), host.options().pinned_memory(true));
  pinned.copy_(host);
  return pinned.to(device, /*non_blocking=*/true);
}

}  // namespace ropekit
