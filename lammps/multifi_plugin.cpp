/* LAMMPS plugin entry point: `plugin load libmultifi_lammps.so` registers pair_style multifi.
   The plugin interface (struct layout and init signature) is LAMMPS' documented C ABI for plugins. */

#include "lammps.h"
#include "pair_multifi.h"

using namespace LAMMPS_NS;

extern "C" {
typedef void *(multifi_factory1)(void *);
typedef void *(multifi_factory2)(void *, int, char **);
typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    multifi_factory1 *v1;
    multifi_factory2 *v2;
  } creator;
  void *handle;
} multifi_plugin_t;
typedef void (*multifi_regfunc)(multifi_plugin_t *, void *);

void lammpsplugin_init(void *lmp, void *handle, void *regfunc);
}

static Pair *multifi_creator(LAMMPS *lmp)
{
  return new PairMultifi(lmp);
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  multifi_plugin_t plugin;
  // built against this LAMMPS' installed headers, so the running version is the one it was built for
  plugin.version = ((LAMMPS *) lmp)->version;
  plugin.style = "pair";
  plugin.name = "multifi";
  plugin.info = "multifi pair style: a multi-fidelity model deployed at one fidelity";
  plugin.author = "multifi";
  plugin.creator.v1 = (multifi_factory1 *) &multifi_creator;
  plugin.handle = handle;
  (*(multifi_regfunc) regfunc)(&plugin, lmp);
}
