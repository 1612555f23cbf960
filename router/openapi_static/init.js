// tiergate's docs page: Swagger UI over /schema/openapi.json, everything served by the router itself.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/schema/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,          // no calls to an online validator: the page works offline
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
