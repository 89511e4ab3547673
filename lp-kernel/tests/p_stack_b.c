// SPDX-License-Identifier: GPL-2.0
/* Scenario "stacking": p_stack_a then p_stack_b on the same function; b wins. */
#include "livepatch.h"

static int new_lp_target_value_b(void)
{
	return 102;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH_NAMED("lp_target:lp_target_value", new_lp_target_value_b)),
		LP_NO_SYMBOLS);
