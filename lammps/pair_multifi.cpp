#include "pair_multifi.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <regex>

using namespace LAMMPS_NS;

namespace {

const char *SYMBOLS[] = {
    "X",  "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si", "P",  "S",
    "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As",
    "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn",
    "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho",
    "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",  "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po",
    "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md",
    "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};

int atomic_number(const std::string &symbol)
{
  for (int z = 1; z < (int) (sizeof(SYMBOLS) / sizeof(SYMBOLS[0])); ++z)
    if (symbol == SYMBOLS[z]) return z;
  return -1;
}

// the few fields of the file's multifi.json that the pair style needs (flat JSON written by multifi)
std::string json_raw(const std::string &json, const std::string &key)
{
  std::smatch m;
  std::regex re("\"" + key + "\"\\s*:\\s*(\"[^\"]*\"|\\[[^\\]]*\\]|[-+0-9.eE]+)");
  if (!std::regex_search(json, m, re)) return "";
  return m[1];
}

std::vector<std::string> json_strings(const std::string &raw)
{
  std::vector<std::string> out;
  std::regex re("\"([^\"]*)\"");
  for (auto it = std::sregex_iterator(raw.begin(), raw.end(), re); it != std::sregex_iterator(); ++it)
    out.push_back((*it)[1]);
  return out;
}

std::vector<double> json_numbers(const std::string &raw)
{
  std::vector<double> out;
  std::regex re("[-+0-9.eE]+");
  for (auto it = std::sregex_iterator(raw.begin(), raw.end(), re); it != std::sregex_iterator(); ++it)
    out.push_back(std::stod(it->str()));
  return out;
}

}    // namespace

PairMultifi::PairMultifi(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  no_virial_fdotr_compute = 1;    // the model returns the virial of its edge vectors
}

PairMultifi::~PairMultifi()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairMultifi::allocate()
{
  allocated = 1;
  int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  for (int i = 1; i < n; i++)
    for (int j = i; j < n; j++) setflag[i][j] = 0;
}

// pair_style multifi FILE [CUTOFF]: CUTOFF (Å), when given, must be the model's
void PairMultifi::settings(int narg, char **arg)
{
  if (narg < 1 || narg > 2) error->all(FLERR, "Illegal pair_style multifi command: pair_style multifi FILE [CUTOFF]");
  filename = arg[0];
  if (!std::ifstream(filename).good()) error->all(FLERR, "pair_style multifi: {}: no such readable file", filename);
  std::unordered_map<std::string, std::string> extra{{"multifi.json", ""}};
  try {
    model = torch::jit::load(filename, torch::kCPU, extra);
  } catch (const std::exception &e) {
    std::string why = e.what();
    why = why.substr(0, why.find('\n'));  // torch's messages run on with a C++ stack trace
    error->all(FLERR,
               "pair_style multifi: cannot load {}: LAMMPS reads a deployed model (multifi deploy MODEL.pt "
               "--fidelity NAME --out FILE); a training model.pt or checkpoint is not one ({})",
               filename, why);
  }
  model.eval();
  const std::string &meta = extra["multifi.json"];
  if (meta.empty()) error->all(FLERR, "pair_style multifi: {} is not a deployed multifi model", filename);
  cutoff = std::stod(json_raw(meta, "cutoff"));
  ghost_cutoff = std::stod(json_raw(meta, "ghost_cutoff"));
  std::string fid = json_raw(meta, "fidelity");
  fidelity = fid.size() >= 2 ? fid.substr(1, fid.size() - 2) : fid;
  elements = json_strings(json_raw(meta, "elements"));
  masses = json_numbers(json_raw(meta, "masses"));
  estimated = json_strings(json_raw(meta, "estimated_elements"));
  open_null = json_numbers(json_raw(meta, "open_compositions"));
  stress_unfitted = json_raw(meta, "stress_labels") == "0";    // null (not recorded) or a count otherwise
  if (elements.empty() || open_null.size() % elements.size() != 0) open_null.clear();
  if (masses.size() != elements.size()) masses.clear();    // written before masses were recorded
  if (narg == 2) {
    if (!utils::is_double(arg[1]))  // e.g. a fidelity name: the deployed file fixes the fidelity
      error->all(FLERR,
                 "pair_style multifi: '{}' is no cutoff; the fidelity is fixed when the model is deployed ({} is at "
                 "{}): multifi deploy MODEL.pt --fidelity NAME --out FILE for another",
                 arg[1], filename, fidelity);
    double requested = utils::numeric(FLERR, arg[1], false, lmp);
    if (std::fabs(requested - cutoff) > 1e-9)
      error->all(FLERR, "pair_style multifi: cutoff {} requested, the model {} was trained with {}", requested,
                 filename, cutoff);
  }
  if (comm->me == 0)
    utils::logmesg(lmp, "multifi: {} at fidelity {}, cutoff {} A, ghost cutoff {} A\n", filename, fidelity,
                   cutoff, ghost_cutoff);
}

// pair_coeff * * Si O ...: the element of each LAMMPS type, each one the model knows
void PairMultifi::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  int ntypes = atom->ntypes;
  if (narg != 2 + ntypes || strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff for multifi: pair_coeff * * followed by one element per atom type ({} types)",
               ntypes);
  type2z.assign(ntypes + 1, 0);
  for (int t = 1; t <= ntypes; t++) {
    std::string sym = arg[1 + t];
    bool known = false;
    for (const auto &e : elements) known = known || e == sym;
    if (!known || atomic_number(sym) < 0)
      error->all(FLERR, "pair_coeff multifi: element {} unknown to the model {} (knows {})", sym, filename,
                 utils::join_words(elements, " "));
    type2z[t] = atomic_number(sym);
  }
  // an element without labels at this fidelity: its reference energy is an estimate (as the Calculator warns)
  std::vector<std::string> said;
  for (int t = 1; t <= ntypes && comm->me == 0; t++) {
    std::string sym = arg[1 + t];
    bool est = false, told = false;
    for (const auto &e : estimated) est = est || e == sym;
    for (const auto &e : said) told = told || e == sym;
    if (!est || told) continue;
    said.push_back(sym);
    error->warning(FLERR,
                   "pair_coeff multifi: the {} reference energy of {} was estimated from the other fidelities (no {} "
                   "training label contained it); expect larger {} energy errors for structures with {}",
                   fidelity, sym, fidelity, fidelity, sym);
  }
  if (stress_unfitted && comm->me == 0)
    error->warning(FLERR,
                   "pair_coeff multifi: no {} training structure of {} had a stress label: its virial and pressure "
                   "(NPT, box relaxations) are the strain derivative of its energy, never fitted to stress labels",
                   fidelity, filename);
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = 1;
}

void PairMultifi::init_style()
{
  if (force->newton_pair == 0) error->all(FLERR, "Pair style multifi requires newton pair on");
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "Pair style multifi requires metal units (eV, Angstrom), not {}", update->unit_style);
  check_masses();
  check_open_composition();
  neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);
  // ghosts out to the receptive field plus the neighbour skin: every local atom energy is then that of the
  // periodic system, also when atoms move into reach between two rebuilds of the lists (ghosts are chosen at them)
  double reach = ghost_cutoff + neighbor->skin;
  if (comm->cutghostuser < reach) comm->cutghostuser = reach;
}

// a system holding elements in proportions no training label of the fidelity had: its reference energy is an
// estimate (as the Calculator warns for such a structure); counted over all ranks at every run, said once
void PairMultifi::check_open_composition()
{
  if (open_null.empty() || open_warned || type2z.empty()) return;
  int ntypes = atom->ntypes;
  std::vector<double> mine(ntypes + 1, 0.0), all(ntypes + 1, 0.0);
  for (int i = 0; i < atom->nlocal; i++) mine[atom->type[i]] += 1.0;
  MPI_Allreduce(mine.data(), all.data(), ntypes + 1, MPI_DOUBLE, MPI_SUM, world);
  size_t n_elem = elements.size(), n_dirs = open_null.size() / n_elem;
  bool open = false;
  std::vector<std::string> held;
  for (int t = 1; t <= ntypes; t++) {
    size_t e = 0;
    while (e < n_elem && atomic_number(elements[e]) != type2z[t]) e++;
    if (e == n_elem || all[t] == 0.0) continue;
    bool involved = false;
    for (size_t d = 0; d < n_dirs; d++) involved = involved || std::fabs(open_null[d * n_elem + e]) > 1e-8;
    bool listed = false;
    for (const auto &h : held) listed = listed || h == elements[e];
    if (involved && !listed) held.push_back(elements[e]);
  }
  for (size_t d = 0; d < n_dirs; d++) {
    double proj = 0.0;
    for (int t = 1; t <= ntypes; t++)
      for (size_t e = 0; e < n_elem; e++)
        if (atomic_number(elements[e]) == type2z[t]) proj += all[t] * open_null[d * n_elem + e];
    open = open || std::fabs(proj) > 1e-6;
  }
  if (!open) return;
  open_warned = true;
  if (comm->me == 0)
    error->warning(FLERR,
                   "pair_style multifi: the system holds {} in proportions no {} training label had (the labels fix "
                   "only a sum of their reference energies): its {} reference energy was estimated; expect larger "
                   "{} energy errors",
                   utils::join_words(held, ", "), fidelity, fidelity, fidelity);
}

// a type whose mass is far from its pair_coeff element's: the elements are most likely listed in another
// order than the data file's types (an isotope, e.g. deuterium, is the one intended case: a warning)
void PairMultifi::check_masses()
{
  if (masses_checked || masses.empty() || comm->me != 0) return;
  masses_checked = true;    // init_style runs at every run/minimize: say it once
  if (atom->mass == nullptr) {
    error->warning(FLERR, "pair_coeff multifi: per-atom masses (this atom style): types not checked against "
                          "the elements' masses");
    return;
  }
  for (int t = 1; t <= atom->ntypes; t++) {
    if (!atom->mass_setflag[t] || type2z[t] <= 0) continue;
    double expected = 0.0;
    for (size_t i = 0; i < elements.size(); i++)
      if (atomic_number(elements[i]) == type2z[t]) expected = masses[i];
    if (expected > 0 && std::fabs(atom->mass[t] - expected) > 0.1 * expected)
      error->warning(FLERR,
                     "pair_coeff multifi: type {} is {} (mass {:.3f}) but has mass {:.3f}: are the elements "
                     "listed in the data file's type order? (an isotope: ignore)",
                     t, SYMBOLS[type2z[t]], expected, atom->mass[t]);
  }
}

double PairMultifi::init_one(int, int)
{
  return cutoff;
}

void PairMultifi::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  if (vflag_atom) error->all(FLERR, "pair_style multifi does not compute per-atom virials");
  const int nlocal = atom->nlocal;
  const int ntotal = nlocal + atom->nghost;
  double **x = atom->x;
  double **f = atom->f;
  int *type = atom->type;
  const double cutsq_model = cutoff * cutoff;

  // pairs of local and ghost centres within the cutoff (the list holds cutoff + skin)
  std::vector<int64_t> src, dst;
  const int n_centres = list->inum + list->gnum;
  for (int ii = 0; ii < n_centres; ii++) {
    const int i = list->ilist[ii];
    const int *jlist = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz < cutsq_model) {
        src.push_back(i);
        dst.push_back(j);
      }
    }
  }
  const int64_t n_edges = (int64_t) src.size();
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor species = torch::empty({ntotal}, i64);
  torch::Tensor positions = torch::empty({ntotal, 3}, f64);
  auto sp = species.accessor<int64_t, 1>();
  auto pos = positions.accessor<double, 2>();
  for (int i = 0; i < ntotal; i++) {
    sp[i] = type2z[type[i]];
    for (int k = 0; k < 3; k++) pos[i][k] = x[i][k];
  }
  torch::Tensor edge_index = torch::empty({2, n_edges}, i64);
  if (n_edges) {
    std::memcpy(edge_index[0].data_ptr<int64_t>(), src.data(), n_edges * sizeof(int64_t));
    std::memcpy(edge_index[1].data_ptr<int64_t>(), dst.data(), n_edges * sizeof(int64_t));
  }
  std::vector<torch::jit::IValue> inputs{species, positions, torch::zeros({3, 3}, f64), edge_index,
                                         torch::zeros({n_edges, 3}, f64), (int64_t) nlocal};
  torch::NoGradGuard no_grad;    // the model differentiates inside; nothing else needs a graph
  auto out = model.forward(inputs).toGenericDict();
  torch::Tensor forces = out.at("forces").toTensor().to(torch::kFloat64).contiguous();
  auto fa = forces.accessor<double, 2>();
  for (int i = 0; i < ntotal; i++)
    for (int k = 0; k < 3; k++) f[i][k] += fa[i][k];
  if (eflag_global) eng_vdwl += out.at("energy").toTensor().item<double>();
  if (eflag_atom) {
    torch::Tensor ea = out.at("atom_energies").toTensor().to(torch::kFloat64).contiguous();
    auto e = ea.accessor<double, 1>();
    for (int i = 0; i < nlocal; i++) eatom[i] += e[i];
  }
  if (vflag_global) {
    torch::Tensor w = out.at("virial").toTensor().to(torch::kFloat64).contiguous();
    auto v = w.accessor<double, 2>();
    virial[0] += v[0][0];
    virial[1] += v[1][1];
    virial[2] += v[2][2];
    virial[3] += v[0][1];
    virial[4] += v[0][2];
    virial[5] += v[1][2];
  }
}
