// Swagger UI for the gatehouse API. The document is the live one, which the backends generate
// from their own types; "Try it out" calls the API on this same origin, through the proxy.
// Log in with POST /auth/login, then paste the token into Authorize.
// The document's address is relative: beside /swagger/ it is /api/openapi.json, and with the
// site under a prefix (/flask/swagger/, the API's prefix removed by the edge) it is
// /flask/api/openapi.json, whose `servers` sends "Try it out" through /flask too.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "../api/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    displayRequestDuration: true,
    // The default validator badge would ask validator.swagger.io: nothing here leaves the
    // origin, so the page works offline and tells no one what it documents.
    validatorUrl: null,
  });
});
