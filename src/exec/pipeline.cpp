// The pipelined stager: layer L's transfers run on the communicator's stream while a copy stream
// writes layer L-1's staging rows into its live slots and stages layer L+1 (local copies, packing)
// into the other area; the host only waits for transfers, never for copies. Area and pack buffer b
// serve layers b, b+2, ...; the copy stream's order and its wait on each layer's transfers keep
// them apart. Each layer still commits only after its own transfers succeed.
#include <algorithm>
#include <memory>

#include "eplb/exec/rearrange.hpp"
#include "exec/layer_transfer.hpp"
#include "util/fail.hpp"

namespace eplb::exec {

class layer_pipeline {
 public:
  layer_pipeline(rearranger& re, const rank_weights& w, placement& maps, const matrix<expert_id>& new_map)
      : re_(re),
        w_(w),
        maps_(maps),
        new_map_(new_map),
        layers_(re.shape_.layers),
        movers_(static_cast<std::size_t>(layers_)),
        sent_(static_cast<std::size_t>(layers_)),
        written_(static_cast<std::size_t>(layers_)),
        began_(static_cast<std::size_t>(layers_)) {}

  std::vector<layer_stats> run() {
    plan_all();
    try {
      re_.copies_->wait(re_.stream_.record());  // staging reads live slots after the caller's earlier work
      for (; next_ < std::min(layers_, 2); ++next_) submit(next_);
      for (int l = 0; l < layers_; ++l) {
        finish_layer(l);
        if (next_ < layers_) submit(next_++);
      }
      commit_through(layers_);
      re_.stream_.synchronize(re_.opts_.timeout);
    } catch (...) {
      unwind();
      throw;
    }
    if (re_.opts_.verify) {
      for (int l = 0; l < layers_; ++l) re_.verify_layer(l, w_, maps_, re_.opts_.verify);
    }
    return std::move(out_);
  }

 private:
  // Every changing layer's transfer, and the staging and packing both areas need.
  void plan_all() {
    const auto all_rows = static_cast<std::size_t>(re_.shape_.slots_per_rank());
    std::vector<std::size_t> pairs;
    for (int l = 0; l < layers_; ++l) {
      auto p = plan_layer(maps_.phy2log(l), new_row(l), re_.shape_.num_ranks, re_.rank_);
      if (p.is_noop()) continue;
      auto& m = movers_[static_cast<std::size_t>(l)];
      m = std::make_unique<layer_transfer>(
          re_.layout(), l, w_, std::move(p), all_rows,
          re_.packing(maps_.phy2log(l), new_row(l), re_.pack_cap(), re_.opts_.register_buffers, pairs));
      rows_ = std::max(rows_, m->rows_needed());  // rows are taken in order from 0
      pack_ = std::max(pack_, m->pack_bytes());
    }
    re_.reserve(re_.staging_, re_.staging_reg_, 2 * rows_ * re_.row_bytes_, 2 * re_.rows_ * re_.row_bytes_);
    re_.reserve(re_.pack_, re_.pack_reg_, 2 * pack_, 2 * re_.layer_area_bytes());
    if (!re_.copies_) re_.copies_ = re_.dev_.create_stream();
  }

  [[nodiscard]] std::span<const expert_id> new_row(int l) const { return new_map_.row(static_cast<std::size_t>(l)); }
  [[nodiscard]] std::byte* area(int l) const {
    return re_.staging_.data() + static_cast<std::size_t>(l % 2) * rows_ * re_.row_bytes_;
  }
  [[nodiscard]] std::byte* pack_area(int l) const { return re_.pack_.data() + static_cast<std::size_t>(l % 2) * pack_; }

  // Stages layer l on the copy stream and submits its transfers, which start once it is staged.
  void submit(int l) {
    const auto u = static_cast<std::size_t>(l);
    began_[u] = std::chrono::steady_clock::now();
    if (!movers_[u]) return;
    try {
      movers_[u]->post(0, 0, area(l), pack_area(l), *re_.copies_, *re_.comm_);
      re_.stream_.wait(re_.copies_->record());
      sent_[u] = re_.comm_->submit();
    } catch (const error& e) {
      re_.comm_->discard_pending();  // half a batch must not join the next one
      fail(e.code(), "layer {}: {}", l, e.what());
    }
  }

  // Waits for layer l's transfers, has the gate decide, commits earlier layers and queues l's
  // write-back on the copy stream.
  void finish_layer(int l) {
    const auto u = static_cast<std::size_t>(l);
    auto& m = movers_[u];
    try {
      if (!m) {
        re_.vote_noop_layer(l, maps_.phy2log(l), new_row(l));
      } else {
        std::exception_ptr failure;
        try {
          re_.comm_->wait(sent_[u]);
        } catch (...) {
          failure = std::current_exception();
        }
        re_.pass_gate(l, 0, failure);
      }
    } catch (const error& e) {
      fail(e.code(), "layer {}: {}", l, e.what());
    }
    if (m) {
      commit_through(l);
      const auto& done = sent_[u];
      // Stream-ordered: the copy stream waits for the transfers; host-complete: they are in place.
      re_.copies_->wait(done.valid() && re_.comm_->caps().stream_ordered ? done : re_.stream_.record());
      writes_.clear();
      m->whole_layer_writes(writes_);
      write_rows(re_.layout(), l, w_, writes_, area(l), *re_.copies_);
      written_[u] = re_.copies_->record();
    }
    layer_stats st = m ? m->stats : layer_stats{.layer = l};
    st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began_[u]).count();
    out_.push_back(st);
    m.reset();
  }

  // A layer's maps change only once its slot writes have landed; by the time layer l's transfers
  // are done, layer l-1's writes usually are too, so the wait costs little.
  void commit_through(int end) {
    for (; confirmed_ < end; ++confirmed_) {
      if (const auto& e = written_[static_cast<std::size_t>(confirmed_)]; e.valid()) {
        try {
          e.wait(re_.opts_.timeout);
        } catch (const error& err) {
          fail(err.code(), "layer {}: writing its slots failed, the layer is partly written ({})", confirmed_,
               err.what());
        }
      }
      maps_.set_layer(confirmed_, new_row(confirmed_));
    }
  }

  // After a failure: batches still in flight only touch staging; wait for them so the buffers can be
  // reused. Layers whose writes are queued commit once those have landed; if the copy stream failed,
  // their maps stay old and commit_through's error has named the partly written layer.
  void unwind() noexcept {
    for (int l = static_cast<int>(out_.size()); l < next_; ++l) {
      try {
        if (movers_[static_cast<std::size_t>(l)]) re_.comm_->wait(sent_[static_cast<std::size_t>(l)]);
      } catch (...) {  // NOLINT(bugprone-empty-catch): the first failure is the one reported
      }
    }
    try {
      re_.copies_->synchronize(re_.opts_.timeout);
      for (; confirmed_ < static_cast<int>(out_.size()); ++confirmed_) maps_.set_layer(confirmed_, new_row(confirmed_));
    } catch (...) {  // NOLINT(bugprone-empty-catch): not landed: the maps stay old
    }
  }

  rearranger& re_;
  const rank_weights& w_;
  placement& maps_;
  const matrix<expert_id>& new_map_;
  int layers_;
  std::vector<std::unique_ptr<layer_transfer>> movers_;
  std::vector<device::event> sent_, written_;
  std::vector<std::chrono::steady_clock::time_point> began_;
  std::size_t rows_ = 0, pack_ = 0;
  int confirmed_ = 0, next_ = 0;
  std::vector<layer_stats> out_;
  row_writes writes_;  // reused by every layer
};

std::vector<layer_stats> rearranger::rearrange_pipelined(const rank_weights& w, placement& maps,
                                                         const matrix<expert_id>& new_map) {
  return layer_pipeline(*this, w, maps, new_map).run();
}

}  // namespace eplb::exec
