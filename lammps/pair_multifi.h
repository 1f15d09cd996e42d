/* pair_style multifi: a multifi model deployed at one fidelity (`multifi deploy`), evaluated with libtorch.
   Full neighbour lists of local and ghost atoms go to the model; ghost atoms reach interactions × cutoff
   (the model's receptive field), so every local energy is exact; forces on ghosts are reverse-communicated
   to their owners (newton on), which makes domain decomposition exact. */

#ifdef PAIR_CLASS
// clang-format off
PairStyle(multifi,PairMultifi);
// clang-format on
#else

#ifndef LMP_PAIR_MULTIFI_H
#define LMP_PAIR_MULTIFI_H

#include "pair.h"

#include <torch/script.h>

#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairMultifi : public Pair {
 public:
  PairMultifi(class LAMMPS *);
  ~PairMultifi() override;
  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;

 protected:
  void check_masses();
  void check_open_composition();
  torch::jit::script::Module model;
  std::string filename;
  double cutoff = 0.0, ghost_cutoff = 0.0;
  std::string fidelity;
  std::vector<std::string> elements;  // the model's elements
  std::vector<double> masses;         // their standard atomic masses (u); empty for files without them
  std::vector<std::string> estimated; // elements whose reference energy at this fidelity was estimated
  std::vector<double> open_null;     // [directions x elements] compositions the fidelity's labels leave open
  bool masses_checked = false, open_warned = false;
  bool stress_unfitted = false;       // no training structure of this fidelity had a stress label
  std::vector<int64_t> type2z;        // LAMMPS type (1-based) -> atomic number
  void allocate();
};

}    // namespace LAMMPS_NS

#endif
#endif
